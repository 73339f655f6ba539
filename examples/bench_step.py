"""Wall time of one distillation iteration, and where it goes, on the tiny random pipeline (CPU by default).

    python examples/bench_step.py                  # batch 1, rank 8
    python examples/bench_step.py --batch_size 8 --rank 64 --gen_every 2   # the toy bench's knobs (DISTIL_KNOBS)

Builds the tiny teachers folder in a temp dir, prepares a run exactly as `collectionlora.train` does, then runs
`train_step` on the effect stream (the most expensive: DMD + TS + TA-FM) and splits each iteration into: the
student's backward simulation (no grad), the real score (teacher, with CFG), the fake score (critic, no grad),
the two trainable forwards (student, critic), backward + optimiser step, and the rest (Python, adapter switching).
"""
import argparse
import collections
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402
from make_tiny_teachers import make_tiny_teachers  # noqa: E402


class Profile:
    """Wraps the few collectionlora functions an iteration spends its time in and adds up seconds per part."""

    def __init__(self):
        self.seconds, self.adapter, self.inside = collections.Counter(), None, []
        use_adapter, predict_v, simulate, update = cl.use_adapter, cl.predict_v, cl.backward_simulation, cl.apply_update

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--gen_every", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20, help="cycles of gen_every iterations (the first 2 are warm-up)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, cl.tiny_image_sizes():
        make_tiny_teachers(Path(tmp) / "teachers", n_images=1)
        cfg = cl.Config(teachers=str(Path(tmp) / "teachers"), base="tiny", out=str(Path(tmp) / "out"), rank=args.rank,
                        alpha=float(args.rank), teacher_steps=8, gen_every=args.gen_every, batch_size=args.batch_size)
        pipe = cl.build_tiny_pipeline(0)
        bank, data, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), [])
        cl.add_trainable_adapters(pipe.transformer, cfg)
        opt_s = torch.optim.AdamW(cl.adapter_params(pipe.transformer, "student"), cfg.lr)
        opt_c = torch.optim.AdamW(cl.adapter_params(pipe.transformer, "critic"), cfg.critic_lr)
        b = data.batch(cl.Route("effect", 0, (0,) * args.batch_size), "cpu")
        bank.swap(0)
        sigmas, gen = cl.student_sigmas(8, 3.0), torch.Generator().manual_seed(0)
        autocast = torch.autocast("cpu", enabled=False)
        profile, cycles = Profile(), []
        for r in range(args.repeats):
            if r == 2:
                profile.seconds.clear()
            t0 = time.perf_counter()
            for step in range(args.gen_every):  # one student update and gen_every critic updates
                cl.train_step(step, pipe.transformer, b, sigmas, opt_s, opt_c, cfg, gen, autocast)
            cycles.append(time.perf_counter() - t0)
        n = (args.repeats - 2) * args.gen_every
        per_iteration = sum(cycles[2:]) / n
        print(f"{1000 * per_iteration:.1f} ms per iteration (median cycle {1000 * statistics.median(cycles[2:]) / args.gen_every:.1f};"
              f" latents {tuple(b.target.shape)}, rank {args.rank}, student every {args.gen_every}, "
              f"{torch.get_num_threads()} threads)")
        parts = dict(profile.seconds.most_common()) | {"the rest (Python, losses, RNG)": sum(cycles[2:]) - sum(profile.seconds.values())}
        for part, secs in parts.items():
            print(f"  {part:32s} {1000 * secs / n:7.1f} ms  {100 * secs / sum(cycles[2:]):5.1f} %")


if __name__ == "__main__":
    main()
