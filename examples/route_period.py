"""How long should the router stay on one effect? N = 10 at the router's period R (`--route_every`: consecutive steps from
one effect, or from the general stream), at batch B, against the 40-step teacher.

    python examples/route_period.py student 20 1        # period 20 (the CLI's default, the official code's) at batch 1
    python examples/route_period.py student 1 1         # period 1 (the paper: a new draw every step) at batch 1
    python examples/route_period.py student 20 8 1      # a third number: another training draw (seed 1)
    python examples/route_period.py measure 1:1 20:1    # 16 seeds, all 10 effects, held-out and training sources;
                                                        #   each R:B[:SEED] against period 1 at its batch and seed

The world is the bench's N = 10 world on the toy base (runs/n10: the effectbench.py command in examples/room_width.py's
docstring builds it), and the students get its budget, 1,200 warm-start + 50 full iterations per effect, with the bench's
knobs but the period, the batch and the seed. Period 5 at batch 8, seed 0, is the bench's own student there; the students of session 35 (periods 1, 10, 20, 50
at batch 8) sit beside it under the same names. At batch 8 a period is 8x the edits of one effect that it is at batch 1,
so batch 1 asks whether the cost of a long period follows the steps or the edits. `measure` prints, per student, its
nearest-valid PSNR minus the 40-step teacher's (CFG 1) as four 4-seed replicates (+- one standard error), then each
against the student of period 1 at its batch and seed (if that one is listed too, else against the first student listed),
and writes runs/n10/route_<students>.json.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402
import room_width as rw  # noqa: E402


def student_dir(period: int, batch: int = 8, seed: int = 0) -> Path:
    """The bench's N = 10 student folder name, with _route<R> (R != 5), _b<B> (B != 8) and _seed<S> (S != 0) added."""
    w = rw.world_of(64)
    return w["home"] / (rw.knobs(10, w["cache"])[0] + f"_route{period}" * (period != 5) + f"_b{batch}" * (batch != 8)
                        + f"_seed{seed}" * (seed != 0))


def student(period: int, batch: int = 8, seed: int = 0) -> None:
    w = rw.world_of(64)
    knobs = rw.knobs(10, w["cache"])[1] | {"route_every": period, "batch_size": batch}
    print(eb.stage_distil(w["teachers"], w["general"], w["base"], student_dir(period, batch, seed), seed, **knobs).get("seconds"))


def tag(period: int, batch: int = 8, seed: int = 0) -> str:
    return f"route{period}_b{batch}" + f"_seed{seed}" * (seed != 0)


def measure(*students: tuple, seeds: int = 16) -> None:
    w, loras = rw.world_of(64), {tag(*s): student_dir(*s) / "lora" for s in students}
    # each student against period 1 at its own batch and seed, where that one is measured too, else against the first listed
    pairs = {tag(*s): tag(1, *s[1:]) if tag(1, *s[1:]) in loras else tag(*students[0]) for s in students}
    out = {}
    for where, r in rw.measure_rows(w["base"], w["teachers"], rw.NAMES, loras, seeds).items():
        gap = r["replicates"] | {f"{m} - {o}": [a - b for a, b in zip(r["replicates"][m], r["replicates"][o])]
                                 for m, o in pairs.items() if m != o}
        out[where] = r | {"replicates": gap}
        print(f"{where}: student - 40-step teacher ({sum(r['reference'].values()) / len(rw.NAMES):.2f} dB), {seeds} seeds")
        for m, v in gap.items():
            print(f"  {m:32s} {'%+.2f +- %.2f' % eb.mean_se(v)} (replicates " + " ".join(f"{x:+.2f}" for x in v) + ")"
                  + "".join(f"  {k} {x:+.2f}" for k, x in r["per_effect"].get(m, {}).items()), flush=True)
    (Path("runs/n10") / f"route_{'_'.join(loras)}.json").write_text(json.dumps(out, indent=1))


def main(argv: list) -> int:
    torch.set_num_threads(1)
    usage = "usage: route_period.py student R [B [SEED]] | measure R:B[:SEED] ... (R period >= 1, B batch >= 1; default B 8, SEED 0)"
    cmd = (argv or ["no command"])[0]
    number = lambda a: int(a) if a.isdigit() else -1
    students = [tuple(map(number, a.split(":"))) for a in argv[1:]] if cmd == "measure" else [tuple(map(number, argv[1:]))]
    ok = lambda s: 1 <= len(s) <= 3 and min(s[:2]) >= 1 and min(s) >= 0
    valid = {"student": len(argv) in (2, 3, 4), "measure": len(argv) >= 2}.get(cmd) and all(map(ok, students))
    need = lambda: [rw.world_of(64)["teachers"]] + ([student_dir(*s) / "lora" for s in students] if cmd == "measure" else [])
    return rw.dispatch(argv, usage, valid, need, lambda: {"student": student, "measure": measure}[cmd](*(
        students if cmd == "measure" else students[0])))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
