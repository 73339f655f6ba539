"""What the rolls' energy score is made of, for rows of a `--quick` bench run and distil_curve.py checkpoints.

    python examples/roll_errors.py --bench runs/effectbench/seed0/quick_t600_toy_img240 --seeds 16 \
        --rows teacher_40_g1,teacher_8,fm_8,fm_teacher_8,collectionlora_8 [--checkpoints RUN/STEP,... --curves runs/curves]

The rolls (`roll_right_2`, `roll_right_3`) have one valid output each, so their energy score splits into two parts:
the error (the mean RMS pixel distance of a sample to the valid output) minus half the spread (the mean distance between
two samples of one source). Printed per row and roll, on the bench's 16 held-out sources at S seeds (sampled as the bench
samples, effectbench.held_out_samples):
  - energy = error - spread;
  - bias: the error of the mean of a source's S samples (what is wrong whatever the noise);
  - mix: each sample fitted by least squares as a mix of the source rolled right by 0..7 cells (after the VAE round
    trip), the weights averaged: a student that confuses roll 2 with roll 3 puts weight on the other one;
  - residual: the RMS distance left after that fit (detail no roll of the source explains).
Rows and checkpoints are named as in examples/energy_noise.py. examples/LAB_NOTES.md, "The rolls' gap (session 23)",
came from this.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402
import energy_noise  # noqa: E402


def split(x: torch.Tensor, valid: torch.Tensor, basis: torch.Tensor) -> dict:
    """x (S, n, D): S samples of n sources; valid (n, D): the one valid output; basis (n, D, B): the source rolled by
    0..B-1 cells. {"energy": error - spread, "error", "spread" (half the mean distance of two samples), "bias", "mix" (the
    least-squares weights of the basis, averaged), "residual"} (module docstring), distances RMS over D."""
    seeds = x.shape[0]
    rms = lambda d: d.pow(2).mean(-1).sqrt()
    error = rms(x - valid).mean(0)  # (n,)
    spread = rms(x[:, None] - x[None]).sum((0, 1)) / (2 * seeds * (seeds - 1))
    b = basis[None].expand(seeds, -1, -1, -1)  # (S, n, D, B)
    w = torch.linalg.lstsq(b, x[..., None]).solution  # (S, n, B, 1)
    return {"energy": float((error - spread).mean()), "error": float(error.mean()), "spread": float(spread.mean()),
            "bias": float(rms(x.mean(0) - valid).mean()), "mix": [round(float(v), 3) for v in w[..., 0].mean((0, 1))],
            "residual": float(rms((b @ w)[..., 0] - x).mean())}


def roll_errors(pipe, world, methods: dict, seeds: int) -> dict:
    """{row: {roll effect: split(...)}} on the held-out sources, sampled as the bench samples."""
    test, n = world.test, len(world.test)
    rt = lambda x: eb.unpack(pipe, eb.pack(pipe, x))  # the VAE round trip
    basis = torch.stack([rt(torch.stack([eb.roll(x, 0, k) for x in test])) for k in range(8)]).flatten(2).permute(1, 2, 0)
    rolls, results = [e for e in world.effects if e.name.startswith("roll_right_")], {}
    for e, runs in eb.held_out_samples(world, rolls, pipe, methods, seeds):
        valid = rt(torch.stack([e.fn(x, 0) for x in test])).flatten(1)  # (n, D)
        for m, (out, _, _) in runs.items():
            r = results.setdefault(m, {})[e.name] = split(out.reshape(seeds, n, -1), valid, basis)  # out: seed-major
            print(f"{m}, {e.name}: energy {r['energy']:.4f} = error {r['error']:.4f} - spread {r['spread']:.4f}; bias "
                  f"{r['bias']:.4f}; mix of rolls by 0..7 cells {r['mix']}; residual {r['residual']:.4f}", flush=True)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    energy_noise.bench_flags(p, "teacher_40_g1,teacher_8,fm_8,fm_teacher_8,collectionlora_8")
    p.add_argument("--seeds", type=int, default=16, help="sampling seeds per held-out source (at least 2)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        energy_noise.refuse(f"--seeds {args.seeds}: pass at least 2 (the spread needs two samples of a source)")
    world, pipe, chosen = energy_noise.load_rows(args)
    results = roll_errors(pipe, world, chosen, args.seeds)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
