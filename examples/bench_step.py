"""Wall time of one distillation step on the tiny random pipeline (CPU by default).

    python examples/bench_step.py            # prints ms per critic-only step and per student+critic step

Builds the tiny teachers folder in a temp dir, prepares a run exactly as `collectionlora.train`
does, then times `train_step` on the effect stream (the most expensive: DMD + TS + TA-FM).
"""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402
from make_tiny_teachers import make_tiny_teachers  # noqa: E402


def main(repeats: int = 30):
    with tempfile.TemporaryDirectory() as tmp, cl.tiny_image_sizes():
        make_tiny_teachers(Path(tmp) / "teachers", n_images=1)
        cfg = cl.Config(teachers=str(Path(tmp) / "teachers"), base="tiny", out=str(Path(tmp) / "out"), rank=8, alpha=8.0,
                        teacher_steps=8)
        pipe = cl.build_tiny_pipeline(0)
        bank, data, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), [])
        cl.add_trainable_adapters(pipe.transformer, cfg)
        opt_s = torch.optim.AdamW(cl.adapter_params(pipe.transformer, "student"), cfg.lr)
        opt_c = torch.optim.AdamW(cl.adapter_params(pipe.transformer, "critic"), cfg.critic_lr)
        b = data.batch(cl.Route("effect", 0, 0), "cpu")
        bank.swap(0)
        sigmas, gen = cl.student_sigmas(8, 3.0), torch.Generator().manual_seed(0)
        autocast = torch.autocast("cpu", enabled=False)
        for label, step in (("critic-only step", 1), ("student + critic step", 0)):
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                cl.train_step(step, pipe.transformer, b, sigmas, opt_s, opt_c, cfg, gen, autocast)
                times.append(time.perf_counter() - t0)
            print(f"{label:24s} median {1000 * statistics.median(times[3:]):7.1f} ms  "
                  f"(latents {tuple(b.target.shape)}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
