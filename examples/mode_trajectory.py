"""Where on its 8 steps does a model pick (or fail to pick) one of a multi-modal effect's outputs? For the teacher (its
8 plain steps) and a distillation's student at chosen checkpoints, per step k of the student sampler: the decoded x0
prediction's PSNR to the nearest valid output, the share nearer the MEAN of the valid outputs than to any one of them
("between": a blend), the share nearer the unedited source, and how often each valid output is the nearest.

    python examples/mode_trajectory.py runs/curves/s5_x4 6000 7500 --teachers runs/curves/quick_teachers_x4
    python examples/mode_trajectory.py runs/curves/s5_long 6000 7500          # the shipped 32 images, one target each

A run of examples/distil_curve.py; held-out sources and noise as the bench's rows (16 x 4 seeds); the effect is
tint_any (--effect NAME for another of the --quick effects). examples/LAB_NOTES.md's "One teacher target per source" quotes it.
"""
import argparse
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import set_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402
import collectionlora as cl  # noqa: E402


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a distil_curve.py run folder (its checkpoints/)")
    p.add_argument("steps", nargs="*", type=int, help="checkpoint steps to measure (none: the teacher only)")
    p.add_argument("--teachers", default="runs/curves/quick_teachers", help="the run's teachers folder")
    p.add_argument("--effect", default="tint_any")
    p.add_argument("--rank", type=int, default=eb.DISTIL_KNOBS["rank"])
    p.add_argument("--seed", type=int, default=0, help="the run's --seed (its student prompts depend on it)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    teachers, seeds = Path(args.teachers), 4
    world = eb.build_world({n: eb.effect_registry()[n] for n in eb.QUICK_EFFECTS}, 0)
    e, test = next(x for x in world.effects if x.name == args.effect), world.test
    pipe = eb.load_all(eb.TOY / "base", world.effects, teachers, {})
    pipe.transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules=list(cl.QWEN_TARGET_MODULES)),
                                 adapter_name="student")
    rep = lambda t: t.repeat(seeds, *[1] * (t.ndim - 1))  # (n, ...) -> (seeds * n, ...), seed-major as evaluate()
    rt = lambda x: eb.unpack(pipe, eb.pack(pipe, x))  # the VAE round trip, as the bench's references
    src = eb.pack(pipe, test)
    valid = torch.stack([rep(rt(torch.stack([e.fn(x, v) for x in test]))) for v in range(e.K)])  # (K, B, 3, H, W)
    source = rep(rt(test))
    noise = torch.randn((seeds * len(test), *src.shape[1:]), generator=torch.Generator().manual_seed(1))
    sigmas = cl.student_sigmas(8, 3.0)

    def trajectory(adapter, text):
        pipe.set_adapters([adapter])
        prompts = eb.encode_prompts(pipe, test, [text] * len(test))
        prompts, x, gen = eb.Prompts(rep(prompts.embeds), rep(prompts.mask)), noise, torch.Generator().manual_seed(2)
        for k in range(8):  # eb.sample_student, every step's x0 kept
            x0 = cl.x0_from_v(x, eb.predict_v(pipe.transformer, x, sigmas[k].expand(len(x)), rep(src), prompts), sigmas[k])
            out = eb.unpack(pipe, x0)
            best, mode = eb.distances(out, valid).min(0)
            between = (out - valid.mean(0)).pow(2).flatten(1).mean(1) < best
            nearer_source = (out - source).pow(2).flatten(1).mean(1) < best
            print(f"  k={k} sigma={float(sigmas[k]):.3f}  PSNR to nearest valid {float((10 * torch.log10(1 / best)).mean()):5.2f}"
                  f"  between {float(between.float().mean()):.2f}  nearer the source {float(nearer_source.float().mean()):.2f}"
                  f"  nearest valid output (histogram) {torch.bincount(mode, minlength=e.K).tolist()}")
            x = cl.add_noise(x0, torch.randn(x0.shape, generator=gen), sigmas[k + 1]) if k + 1 < 8 else x0

    print(f"teacher ({args.effect}), 8 plain steps")
    trajectory(args.effect, e.instruction)
    prompt = eb.planned_prompts(teachers, eb.TOY / "base", args.seed)[args.effect]
    for step in args.steps:
        state = torch.load(Path(args.run) / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["student"]
        set_peft_model_state_dict(pipe.transformer, state, adapter_name="student")
        print(f"student at step {step}")
        trajectory("student", prompt)


if __name__ == "__main__":
    main()
