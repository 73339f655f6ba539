"""Wall time of one distillation iteration, and where it goes, on a random pipeline (CPU by default).

    python examples/bench_step.py                  # the tiny pipeline: batch 1, rank 8
    python examples/bench_step.py --model tiny mid --out speed.md   # + a 32M-parameter transformer, table to a file
    python examples/bench_step.py --batch_size 8 --rank 64 --gen_every 2   # the toy bench's knobs (DISTIL_KNOBS)

Builds a teachers folder (examples/make_tiny_teachers.py's three effects, as LoRAs of this pipeline's transformer) in a
temp dir, prepares a run exactly as `collectionlora.train` does, then runs `train_step` on the effect stream (the most
expensive: DMD + TS + TA-FM) and splits each iteration into: the student's backward simulation (no grad), the real
score (teacher, with CFG), the fake score (critic, no grad), the two trainable forwards (student, critic), backward +
optimiser step, and the rest (Python, adapter switching).

Then a speed table, one column per --model:
  * the share of an iteration spent inside the transformer's forward and autograd's backward (goal >= 90 %; the rest
    is Python, peft's adapter switching, losses, the optimiser);
  * one TeacherBank.swap to another teacher against one iteration (goal <= 5 %); `train` swaps at most once per
    route_every iterations (the CLI's default 1, the paper's; the official code's 20), so the amortised share is also given;
  * one edit by the student (8 steps, no CFG: 8 NFE) and one by a teacher (40 steps with CFG g = 5: 80 NFE) through
    the stock pipeline (`collectionlora.sample`: text encoding and VAE decoding included), seconds each.
`--model mid` puts a random 32M-parameter QwenImageTransformer2DModel (6 blocks, width 384) in place of the tiny
pipeline's 0.2M one; the tiny text encoder and VAE stay (same joint_attention_dim and latent channels), so matrix
products, not Python, dominate as for the real 20B transformer on a GPU.
"""
import argparse
import collections
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import QwenImageTransformer2DModel
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402
from make_tiny_teachers import EFFECTS, build_tiny_pipeline, random_image, random_lora  # noqa: E402

MID = dict(num_layers=6, attention_head_dim=64, num_attention_heads=6, axes_dims_rope=(16, 24, 24))  # width 384
DEFAULT_REPEATS = {"tiny": 20, "mid": 4}


class Profile:
    """While active, wraps the few collectionlora functions an iteration spends its time in and adds up seconds per part."""

    def __init__(self):
        self.seconds, self.adapter, self.inside = collections.Counter(), None, []
        self.originals = {n: getattr(cl, n) for n in ("use_adapter", "predict_v", "backward_simulation", "apply_update")}

    def __enter__(self):
        use_adapter, predict_v, simulate, update = (self.originals[n] for n in
                                                    ("use_adapter", "predict_v", "backward_simulation", "apply_update"))

        def timed(part, fn, *args):
            self.inside.append(part)
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.inside.pop()
                if not self.inside:  # only the outermost part counts: no time is counted twice
                    self.seconds[part] += time.perf_counter() - t0

        def tracked_use_adapter(transformer, name):
            self.adapter = name
            return timed("adapter switching", use_adapter, transformer, name)

        def part_of(name):
            grad = torch.is_grad_enabled()
            return {"student": "student forward (grad)" if grad else "student x0 (no grad)", None: "real score (base)",
                    "teacher": "real score (teacher, CFG)", "critic": "critic forward (grad)" if grad else "fake score (critic)"}[name]
        cl.use_adapter = tracked_use_adapter
        cl.predict_v = lambda transformer, *a: timed(part_of(self.adapter), predict_v, transformer, *a)
        cl.backward_simulation = lambda *a: timed("backward simulation (no grad)", simulate, *a)
        cl.apply_update = lambda *a: timed("backward + AdamW step", update, *a)
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(cl, name, fn)


class Compute:
    """While active: seconds inside the transformer's forward (module hooks) and inside autograd's backward
    (Tensor.backward), and the number of transformer forwards (NFE)."""

    def __init__(self, transformer):
        self.transformer, self.seconds, self.calls, self.handles = transformer, collections.Counter(), 0, []

    def __enter__(self):
        started = []

        def pre(*_):
            started.append(time.perf_counter())

        def post(*_):
            self.seconds["transformer forward"] += time.perf_counter() - started.pop()
            self.calls += 1
        self.handles = [self.transformer.register_forward_pre_hook(pre), self.transformer.register_forward_hook(post)]
        self.backward = backward = torch.Tensor.backward

        def timed_backward(tensor, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return backward(tensor, *args, **kwargs)
            finally:
                self.seconds["autograd backward"] += time.perf_counter() - t0
        torch.Tensor.backward = timed_backward
        return self

    def __exit__(self, *exc):
        torch.Tensor.backward = self.backward
        for h in self.handles:
            h.remove()


def build_pipeline(model: str):
    """The tiny random pipeline; for 'mid', a wider and deeper random transformer in place of its own."""
    pipe = build_tiny_pipeline(0)
    if model == "mid":
        small = pipe.transformer.config  # keep what the text encoder and the VAE fix: joint dim, channels, patch
        torch.manual_seed(0)
        pipe.register_modules(transformer=QwenImageTransformer2DModel(
            patch_size=small.patch_size, in_channels=small.in_channels, out_channels=small.out_channels,
            joint_attention_dim=small.joint_attention_dim, **MID).eval())
    return pipe


def write_teachers(pipe, folder: Path) -> None:
    """examples/make_tiny_teachers.py's effects (mixed ranks and alphas), as random LoRAs of this pipeline's transformer."""
    rng = torch.Generator().manual_seed(1)
    for i, (name, instruction, rank, alpha) in enumerate(EFFECTS):
        sub = folder / name
        (sub / "images").mkdir(parents=True)
        sd, config = random_lora(pipe, rank, alpha, seed=100 + i)
        type(pipe).save_lora_weights(sub, transformer_lora_layers=sd, transformer_lora_adapter_metadata=config.to_dict(),
                                     weight_name=f"{name}.safetensors")
        (sub / "effect.json").write_text(json.dumps({"instruction": instruction}))
        random_image(rng).save(sub / "images" / "0.png")


def timed_edits(pipe, compute: Compute, image, prompt: str, steps: int, guidance: float, repeats: int) -> tuple:
    """(median seconds, NFE) of `repeats` edits with cl.sample, after one warm-up edit."""
    seconds = []
    for seed in range(repeats + 1):
        calls, t0 = compute.calls, time.perf_counter()
        cl.sample(pipe, image, prompt, steps, seed, guidance=guidance)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds[1:]), compute.calls - calls


def bench(model: str, args) -> dict:
    repeats = args.repeats or DEFAULT_REPEATS[model]
    with tempfile.TemporaryDirectory() as tmp, cl.tiny_image_sizes():
        pipe = build_pipeline(model)
        write_teachers(pipe, Path(tmp) / "teachers")
        cfg = cl.Config(teachers=str(Path(tmp) / "teachers"), base="tiny", out=str(Path(tmp) / "out"), rank=args.rank,
                        alpha=float(args.rank), teacher_steps=8, gen_every=args.gen_every, batch_size=args.batch_size)
        teacher_scheduler = pipe.scheduler  # prepare() gives the pipeline the student's scheduler; teachers keep this one
        effects = cl.read_teachers(cfg.teachers)
        bank, data, _ = cl.prepare(pipe, cfg, effects, [])
        student_scheduler = pipe.scheduler
        cl.add_trainable_adapters(pipe.transformer, cfg)
        transformer = pipe.transformer
        opt_s = torch.optim.AdamW(cl.adapter_params(transformer, "student"), cfg.lr)
        opt_c = torch.optim.AdamW(cl.adapter_params(transformer, "critic"), cfg.critic_lr)
        b = data.batch(cl.Route("effect", 0, (0,) * args.batch_size), "cpu")
        bank.swap(0)
        sigmas, gen = cl.student_sigmas(8, 3.0), torch.Generator().manual_seed(0)
        autocast = torch.autocast("cpu", enabled=False)
        cycles = []
        with Profile() as profile, Compute(transformer) as compute:
            for r in range(repeats):
                if r == 2:  # the first two cycles are warm-up
                    profile.seconds.clear()
                    compute.seconds.clear()
                t0 = time.perf_counter()
                for step in range(args.gen_every):  # one student update and gen_every critic updates
                    cl.train_step(step, transformer, b, sigmas, opt_s, opt_c, cfg, gen, autocast)
                cycles.append(time.perf_counter() - t0)
        n, measured = (repeats - 2) * args.gen_every, sum(cycles[2:])
        per_iteration = measured / n
        print(f"[{model}] {1000 * per_iteration:.1f} ms per iteration (median cycle "
              f"{1000 * statistics.median(cycles[2:]) / args.gen_every:.1f}; latents {tuple(b.target.shape)}, rank "
              f"{args.rank}, student every {args.gen_every}, {torch.get_num_threads()} threads)")
        parts = dict(profile.seconds.most_common()) | {"the rest (Python, losses, RNG)": measured - sum(profile.seconds.values())}
        for part, secs in parts.items():
            print(f"  {part:32s} {1000 * secs / n:7.1f} ms  {100 * secs / measured:5.1f} %")

        # the teacher swap: alternate between two teachers, so that every call copies a teacher into the slot
        swaps = []
        for i in range(args.swaps):
            t0 = time.perf_counter()
            bank.swap(1 - bank.active)
            swaps.append(time.perf_counter() - t0)

        # one edit: the student (8 NFE, its scheduler) and a teacher (40 steps x CFG, the base's own scheduler)
        image = Image.open(effects[0].images[0]).convert("RGB")
        with Compute(transformer) as counter:
            cl.use_adapter(transformer, "student")
            pipe.scheduler = student_scheduler
            student = timed_edits(pipe, counter, image, effects[0].student_prompt, 8, 1.0, args.edits)
            bank.swap(0)
            cl.use_adapter(transformer, "teacher")
            pipe.scheduler = teacher_scheduler
            teacher = timed_edits(pipe, counter, image, effects[0].instruction, 40, cfg.guidance, args.edits)
        return {"params": sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n),
                "tokens": (2 * b.target.shape[1], b.student.embeds.shape[1]), "iteration": per_iteration,
                "forward": compute.seconds["transformer forward"] / n, "backward": compute.seconds["autograd backward"] / n,
                "swap": statistics.median(swaps), "student": student, "teacher": teacher, "route_every": cfg.route_every,
                "iterations": n}


def speed_table(results: dict) -> str:
    def row(label, fn):
        return f"| {label} | " + " | ".join(fn(r) for r in results.values()) + " |"

    def share(r):
        return (r["forward"] + r["backward"]) / r["iteration"]
    lines = ["| | " + " | ".join(results) + " |", "|---|" + "---|" * len(results),
             row("transformer parameters (base)", lambda r: f"{r['params'] / 1e6:.2f}M"),
             row("sequence: image (output + source) + text tokens", lambda r: f"{r['tokens'][0]} + {r['tokens'][1]}"),
             row("one iteration (ms; mean of the measured ones)", lambda r: f"{1000 * r['iteration']:.1f} ({r['iterations']})"),
             row("inside transformer forward + backward (goal >= 90 %)", lambda r: f"**{100 * share(r):.1f} %**"),
             row("  forward / backward (ms per iteration)", lambda r: f"{1000 * r['forward']:.1f} / {1000 * r['backward']:.1f}"),
             row("teacher swap (ms, median)", lambda r: f"{1000 * r['swap']:.2f}"),
             row("swap / one iteration (goal <= 5 %)", lambda r: f"**{100 * r['swap'] / r['iteration']:.1f} %**"),
             row("swap amortised (at most 1 per route_every iterations)",
                 lambda r: f"{100 * r['swap'] / r['iteration'] / r['route_every']:.2f} %"),
             row("student edit, 8 steps no CFG (s; NFE)", lambda r: f"{r['student'][0]:.3f} ({r['student'][1]})"),
             row("teacher edit, 40 steps with CFG (s; NFE)", lambda r: f"{r['teacher'][0]:.3f} ({r['teacher'][1]})"),
             row("teacher / student time", lambda r: f"{r['teacher'][0] / r['student'][0]:.1f}x")]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", choices=["tiny", "mid"], default=["tiny"],
                   help="tiny: the 0.2M-parameter test transformer; mid: a random 32M-parameter one in its place")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--gen_every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=None,
                   help="cycles of gen_every iterations, the first 2 are warm-up (default: tiny 20, mid 4)")
    p.add_argument("--swaps", type=int, default=20, help="teacher swaps timed")
    p.add_argument("--edits", type=int, default=2, help="edits timed per sampler (after one warm-up edit)")
    p.add_argument("--out", help="also write the speed table to this markdown file")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    results = {m: bench(m, args) for m in args.model}
    report("Speed (CPU)", f"batch {args.batch_size}, rank {args.rank}, student every {args.gen_every}", t0,
           speed_table(results), args.out)


def report(title: str, settings: str, t0: float, body: str, out: str | None) -> None:
    """Prints a markdown section (machine, date, settings, wall time since t0, then body) and writes it to `out`."""
    header = (f"{datetime.datetime.now().isoformat(timespec='minutes')} | {platform.platform()} | {os.cpu_count()} CPUs, "
              f"{torch.get_num_threads()} torch threads | torch {torch.__version__} | {settings} | wall time "
              f"{time.perf_counter() - t0:.0f} s")
    text = f"\n## {title}\n\n{header}\n\n{body}\n"
    print(text)
    if out:
        Path(out).write_text(text)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
