"""Measured peak GPU memory and seconds per step of `collectionlora.train_step` on the full-size Qwen-Image transformer.

    python examples/bench_gpu_step.py --out gpu_step.md          # on the GPU: 512^2 and 1024^2, 3 timed steps of each kind
    python examples/bench_gpu_step.py --sides 512 --steps 1      # quicker: one side, one timed step of each kind
    python examples/bench_gpu_step.py --no_checkpointing         # without gradient checkpointing (expect OOM)
    python examples/bench_gpu_step.py --device cpu --small       # CPU check of the whole path (2 blocks, sides 64/128)

What it measures: the real 20.4B QwenImageTransformer2DModel (bench_memory's QWEN_IMAGE config, random weights)
with the run's adapters (student and critic by `collectionlora.add_trainable_adapters`, rank 128, fp32; the teacher
slot as TeacherBank adds it, bf16, filled with small random values), gradient checkpointing on (as `train` on CUDA),
bf16 base and autocast from `collectionlora.device_setup`, and random encoded inputs of one edit (batch 1) per output
side: L = (side/16)^2 latent tokens for the output plus as many for the source image, --text_tokens text tokens. Per
side: one warm-up `train_step` (a student + critic step, which also allocates both AdamW states), then --steps timed
student + critic steps (step % gen_every == 0: DMD + target simulation + TA-FM, then the critic) and --steps timed
critic-only steps, on the effect stream (the most expensive), synchronised around each. Peak allocated / reserved
memory is torch.cuda's, reset per side (so it includes the fixed weights and the AdamW states). The times vary from
step to step: each step draws how far the student's backward simulation runs (0..7 no-grad forwards).

Memory: the bf16 base alone is ~41 GB (40.86), the teacher slot 2.36 GB, the fp32 student and critic 4.72 GB each,
their AdamW moments another 18.8 GB: 71.5 GB fixed (README "Memory plan", from bench_memory.py; apply_update frees an
adapter's grads, 4.7 GB, right after its step). With checkpointing the plan's peaks are ~80.9 GB at 512^2 (the AdamW
step: grads + sqrt(v)) and ~89.3 GB at 1024^2 (compare the "peak allocated" column); without checkpointing ~164 and
~391 GB (OOM even on an H200). On an 80 GB GPU (85.5e9 bytes) 512^2 may just fit, 1024^2 should not: the script
reports "OOM" for a side instead of crashing (and the peak it reached before failing).

Expected runtime on an H200 (an estimate from FLOPs, not measured: ~0.2 s per forward of the 20B model at 512^2,
~0.75 s at 1024^2; a student + critic step is ~25 forward-equivalents, a critic-only step ~8): ~1 min to import and
build (the weights are created on `meta`, then allocated and filled with random values on the GPU, never on the CPU),
~0.5 min at 512^2, ~2 min at 1024^2: ~4 min in all; `--sides 512 --steps 1` takes ~1.5 min. Give the run a 600 s limit.
"""
import argparse
import datetime
import gc
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import diffusers
import torch
from diffusers import QwenImageTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_memory as bm  # noqa: E402  (also puts the repository root on sys.path)
import collectionlora as cl  # noqa: E402

SMALL = dict(bm.QWEN_IMAGE, num_layers=2, num_attention_heads=4)  # width 512, the real text width and latent channels
ADAPTERS = ("student", "critic", "teacher")


@torch.no_grad()
def fill_random(params, gen, lora_b_std=None) -> None:
    """Random values in place, on the parameters' own device: matrices ~ N(0, 1/fan_in) (activations keep their scale
    through 60 blocks, so the losses stay finite), 1-D weights (norms) 1, biases 0; LoRA B ~ N(0, lora_b_std^2)."""
    for name, p in params:
        if p.ndim == 1:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
        else:
            std = lora_b_std if lora_b_std is not None and ".lora_B." in name else p.shape[1] ** -0.5
            p.normal_(0.0, std, generator=gen)


def build(c: dict, cfg: cl.Config, device, dtype, teacher_rank: int, checkpointing: bool):
    """The transformer on `meta`, cast, then allocated on `device` uninitialised (to_empty) and filled there; the
    adapters are created directly on `device` too. Returns the frozen transformer with student, critic and teacher slot."""
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**c)
    rope = transformer.pos_embed  # its frequency tables are plain tensor attributes: to_empty would leave them on meta
    transformer.pos_embed = type(rope)(theta=rope.theta, axes_dim=rope.axes_dim, scale_rope=rope.scale_rope)  # CPU, small
    transformer = transformer.to(dtype).to_empty(device=device).requires_grad_(False)
    gen = torch.Generator(device).manual_seed(cfg.seed)
    fill_random(transformer.named_parameters(), gen)
    with torch.device(device):  # peft creates (and initialises) the LoRA layers on the GPU, not on the CPU
        cl.add_trainable_adapters(transformer, cfg)  # student and critic: B = 0, fp32
        bm.add_teacher_slot(transformer, teacher_rank)  # frozen, in the base's dtype, as TeacherBank adds it
    fill_random([(n, p) for n, p in transformer.named_parameters() if ".teacher." in n], gen, 0.1 / teacher_rank ** 0.5)
    left = [n for m in transformer.modules() for n, t in vars(m).items() if torch.is_tensor(t) and t.is_meta]
    left += [n for n, t in transformer.state_dict().items() if t.is_meta]
    assert not left, f"tensors still on meta: {left[:5]}"
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def random_batch(c: dict, side: int, text_tokens: int, dtype, device, seed: int) -> cl.Batch:
    """One edit on the effect stream: random student / teacher / negative inputs (bench_memory.random_inputs: latents
    (1, L, 64), text (1, T, 3584), no mask, img_shapes [[(1, n, n), (1, n, n)]]) and a random teacher target (1, L, 64)."""
    gen, n = torch.Generator().manual_seed(seed), side // 16
    inputs = [cl.EditInputs(**vars(bm.random_inputs(c, n, text_tokens, dtype, gen))).to(device) for _ in range(3)]
    target = torch.randn(1, n * n, c["in_channels"], generator=gen).to(device)
    return cl.Batch(*inputs, teacher_adapter="teacher", target=target)


def lora_b_norms(transformer) -> dict:
    """{adapter: |LoRA B|} (student and critic start at B = 0, so a nonzero value means the updates reached them)."""
    with torch.no_grad():
        return {a: sum(float(p.float().norm()) ** 2 for n, p in transformer.named_parameters()
                       if f".lora_B.{a}." in n) ** 0.5 for a in ADAPTERS}


def out_of_memory(e: Exception) -> str:
    """The gist of an out-of-memory error ('' for any other error): torch's OutOfMemoryError, or a library's
    allocation failure surfacing as a RuntimeError (cuBLAS / cuDNN workspaces)."""
    text = str(e)
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "ALLOC_FAILED" in text:
        return ". ".join(text.split(". ")[:2]).split("\n")[0][:160] or "out of memory"
    return ""


def seconds(times: list) -> str:
    return f"{statistics.mean(times):.2f} ({min(times):.2f}-{max(times):.2f})" if len(times) > 1 else f"{times[0]:.2f}"


def bench_side(transformer, c, side, args, cfg, device, dtype, autocast, opts, gen, sigmas) -> tuple:
    """Warm-up, then timed student + critic and critic-only steps. Returns the table row and the latest value of each loss."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    n_img, n_txt = bm.tokens(side, args.text_tokens)
    row = [f"{side}^2", f"{n_img:,} + {n_txt}"]
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, notes, logs, step = {True: [], False: []}, [], {}, 0
    try:
        b = random_batch(c, side, args.text_tokens, dtype, device, seed=side)
        steps = [0] + [cfg.gen_every * (i + 1) + j for i in range(args.steps) for j in (0, 1)]  # 0 = the warm-up
        for i, step in enumerate(steps):
            sync()
            t0 = time.perf_counter()
            step_logs = cl.train_step(step, transformer, b, sigmas, opts["student"], opts["critic"], cfg, gen, autocast)
            sync()
            if i > 0:
                times[step % cfg.gen_every == 0].append(time.perf_counter() - t0)
            notes += [f"step {step}: {s} skipped" for s in step_logs.pop("skipped")]
            notes += [f"step {step}: {k} = {v}" for k, v in step_logs.items() if not math.isfinite(v)]
            logs |= step_logs
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        notes.append(f"OOM at step {step}{' (warm-up)' if step == 0 else ''}: {out_of_memory(e)}")
        times = None
    if times is None:  # outside the except clause: its traceback no longer holds the step's tensors
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    if cuda:
        row += [f"{torch.cuda.max_memory_allocated(device) / bm.GB:.1f}", f"{torch.cuda.max_memory_reserved(device) / bm.GB:.1f}"]
    else:
        row += ["n/a on CPU", "n/a on CPU"]
    row += ["OOM", "OOM"] if times is None else [seconds(times[True]), seconds(times[False])]
    return row + ["; ".join(notes) or "all updates applied, losses finite"], logs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (the --small check)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"), help="collectionlora's --dtype: auto = "
                   "bf16 base and autocast on CUDA, fp32 on the CPU")
    p.add_argument("--small", action="store_true", help="2 blocks, 4 heads x 128 (sides 64 128 unless --sides)")
    p.add_argument("--sides", type=int, nargs="+", help="output image sides (default 512 1024; 64 128 with --small)")
    p.add_argument("--steps", type=int, default=3, help="timed steps of each kind per side, after one warm-up step")
    p.add_argument("--text_tokens", type=int, default=256, help="prompt tokens (condition image + template + instruction)")
    p.add_argument("--rank", type=int, default=128, help="student and critic rank (alpha = rank), the paper's 128")
    p.add_argument("--teacher_rank", type=int, default=128, help="teacher slot rank (= the largest teacher rank)")
    p.add_argument("--no_checkpointing", action="store_true", help="no gradient checkpointing")
    p.add_argument("--out", help="also write the table to this markdown file")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("no CUDA device here -- the CPU check is --device cpu --small")
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    c, sides = (SMALL, args.sides or [64, 128]) if args.small else (bm.QWEN_IMAGE, args.sides or [512, 1024])
    cfg = cl.Config(rank=args.rank, alpha=float(args.rank), device=args.device, dtype=args.dtype,
                    gradient_checkpointing=not args.no_checkpointing)
    device, dtype, autocast = cl.device_setup(cfg)
    cuda = device.type == "cuda"
    if cuda:  # as collectionlora.train does
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    out = [f"# collectionlora.train_step: measured memory and speed{' (small CPU check)' if args.small else ''}\n",
           f"{name} | {datetime.datetime.now().isoformat(timespec='minutes')} | torch {torch.__version__}, "
           f"diffusers {diffusers.__version__} | base {str(dtype)[6:]}, bf16 autocast {'on' if dtype == torch.bfloat16 else 'off'} | "
           f"gradient checkpointing {'off' if args.no_checkpointing else 'on'}\n"]
    try:
        t0 = time.perf_counter()
        transformer = build(c, cfg, device, dtype, args.teacher_rank, not args.no_checkpointing)
        build_s = time.perf_counter() - t0
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        out.append(f"OOM while building the model and its adapters: {out_of_memory(e)}")
        return report(out, args.out, 1)
    count = bm.group_params(transformer, ADAPTERS)
    out.append(f"model: {count['base'][0] / 1e9:.2f}B params ({c['num_layers']} blocks, width "
               f"{c['num_attention_heads'] * c['attention_head_dim']}); student + critic r={args.rank} "
               f"({count['student'][0] / 1e6:,.0f}M each, {count['student'][1]}), teacher slot r={args.teacher_rank} "
               f"({count['teacher'][1]}); built in {build_s:.0f} s" + (
                   f", {torch.cuda.memory_allocated(device) / bm.GB:.1f} GB allocated after the build" if cuda else "") + "\n")
    opts = {a: torch.optim.AdamW(cl.adapter_params(transformer, a), lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
            for a, lr in (("student", cfg.lr), ("critic", cfg.critic_lr))}
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    sigmas = cl.student_sigmas(cfg.student_steps, cfg.shift).to(device)
    before, rows = lora_b_norms(transformer), []
    for side in sides:
        row, logs = bench_side(transformer, c, side, args, cfg, device, dtype, autocast, opts, gen, sigmas)
        rows.append(row)
        print(" | ".join(row), "| latest losses:", {k: round(v, 4) for k, v in logs.items()}, flush=True)
    after = lora_b_norms(transformer)
    out.append(bm.table(["output", "tokens img + txt", "peak allocated GB", "peak reserved GB",
                         f"s / student + critic step (mean, min-max of {args.steps})", "s / critic-only step", "notes"], rows))
    out.append("\n|LoRA B| before -> after: " + ", ".join(f"{a} {before[a]:.3g} -> {after[a]:.3g}" for a in ADAPTERS)
               + " (student and critic start at 0; the teacher slot is frozen)\n")
    out.append(f"(batch 1, rank {args.rank}, gen_every {cfg.gen_every}, guidance {cfg.guidance}, effect stream; "
               f"wall time {time.perf_counter() - t_start:.0f} s)")
    return report(out, args.out, 0)


def report(lines: list, path: str | None, code: int) -> int:
    print("\n" + "\n".join(lines))
    if path:
        Path(path).write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
