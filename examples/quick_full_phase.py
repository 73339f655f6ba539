"""One change to the full phase of the `--quick` student: resume its run from the warm-start checkpoint at 11,250 (of
12,000 warm-start iterations) with one knob changed, run the rest (the full objective to 13,500), and measure the result
beside the unchanged student with the bench's evaluate() (16 held-out sources x 4 seeds, energy score included).

    python examples/effectbench.py --quick                       # first: the run this starts from
    python examples/quick_full_phase.py same '{}'                # a control: must repeat the --quick student exactly
    python examples/quick_full_phase.py lr1e-3 '{"lr": 0.001}'   # the full objective at 10x the lr
    python examples/quick_full_phase.py gen5 '{"gen_every": 5}'  # the paper's 5 critic updates per student update (bench: 2)

Each variant writes runs/quick_full_phase/<name>/ (about 9 min on one core, 2 for the measurement).
"""
import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402
import effectbench as eb  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="the variant's folder name under runs/quick_full_phase/")
    p.add_argument("change", help="the changed knobs as JSON, e.g. '{\"lr\": 0.001}' (collectionlora.Config fields)")
    p.add_argument("--run", default="runs/effectbench/seed0/quick_t600_toy", help="the --quick run's folder")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    run, change = Path(args.run), json.loads(args.change)
    student = next(run.glob("distil_w12000_13500_*_gw"), None)
    if student is None or not (student / "checkpoints" / "step_00011250.pt").is_file():
        p.exit(2, f"error: --run {run} holds no --quick student with its 11,250 checkpoint -- run effectbench.py --quick first\n")
    if unknown := set(change) - {f.name for f in dataclasses.fields(cl.Config)}:
        p.exit(2, f"error: change {sorted(unknown)}: not collectionlora.Config fields -- see python collectionlora.py --help\n")
    out = Path("runs/quick_full_phase") / args.name
    if not (out / "lora").is_dir():
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy(student / "checkpoints" / "step_00011250.pt", out / "checkpoints")
        config = json.loads((student / "lora" / "collectionlora.json").read_text())["config"]
        cl.train(cl.Config(**config | {"out": str(out), "resume": True, "overwrite": False,
                                       "target_modules": tuple(config["target_modules"])} | change))
    registry = eb.effect_registry()
    world = eb.build_world({k: registry[k] for k in eb.QUICK_EFFECTS}, 0)
    with eb.bench_sizes():
        pipe = eb.load_all(eb.TOY / "base", world.effects, run / "teachers", {"variant": out / "lora", "quick": student / "lora"})
        methods = {"quick": eb.Method(lambda e: ["quick"], eb.student_prompts(student / "lora")),  # each its own prompts
                   args.name: eb.Method(lambda e: ["variant"], eb.student_prompts(out / "lora"))}
        r = eb.evaluate(world, world.effects, pipe, methods, 4, "quick", quiet=True)["results"]
    for m, row in eb.summarise(r, list(methods)).items():
        print(f"{m:12s} PSNR {row['psnr_valid']:.2f} coverage {row['coverage']:.2f} BCR {row['bad_case']:.3f} energy "
              f"{row['energy']:.4f} | " + " ".join(f"{e} {r[e][m]['psnr_valid']:.1f}/{r[e][m]['energy']:.4f}" for e in r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
