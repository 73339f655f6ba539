"""Is N's cost a near neighbour? The first 5 effects of the bench's N = 10 world, and a sixth added at one budget per effect.

    python examples/n_step_neighbour.py student tint_red          # first 5 + one of the other five, 1,200 warm-start +
    python examples/n_step_neighbour.py student swap_invert_any   #   50 full iterations per effect (N = 6)
    python examples/n_step_neighbour.py student contrast_1_3
    python examples/n_step_neighbour.py measure tint_red swap_invert_any contrast_1_3   # 16 seeds, per effect, both source sets

From N = 5 to N = 10 (examples/room_width.py, width 64) the first 5 effects lose 0.52 dB on average, but not evenly: most
of it is `tint_any` (a tint in one of four hues, red among them), `invert` and `roll_right_3`. Among the five added are
`tint_red` and `tint_scarlet` (a red tint: near one of `tint_any`'s outputs, with a near prompt) and `swap_invert_any`
(swap two channels and invert: near `invert`). If the cost is interference between near edits, adding `tint_red` costs
`tint_any`, adding `swap_invert_any` costs `invert`, and adding `contrast_1_3` (near none of them) costs little; if it
is a cost of N itself, each sixth effect costs the five about the same. The world and the N = 5 / N = 10 students are
room_width.py's (build them as its docstring says); the teacher targets come from its cache. `measure` prints each
row's gap to the 40-step teacher (CFG 1) per effect, and each N = 6 row against N = 5 with the paired standard error of
four 4-seed replicates; it writes runs/n10/n_step_neighbour_<effects>.json. `student n5_seed1` and `student n10_seed1`
train the N = 5 and N = 10 students again with seed 1 (router, noise, LoRA init and triggers), for their training noise.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402
import room_width as rw  # noqa: E402

FIRST, OTHERS = rw.NAMES[:5], rw.NAMES[5:]


DRAWS = {"n5_seed1": 5, "n10_seed1": 10}  # room_width.py's N = 5 and N = 10 students, trained again with seed 1


def student_dir(extra: str) -> Path:
    """The student of the first 5 effects + `extra`, or (extra in DRAWS) the second training draw of N = 5 or 10."""
    if extra in DRAWS:
        return rw.student_dir(64, DRAWS[extra]).with_name(rw.student_dir(64, DRAWS[extra]).name + "_seed1")
    home = rw.world_of(64)["home"]
    return home.with_name(f"{home.name}_first5_{extra}") / rw.knobs(6, rw.world_of(64)["cache"])[0]


def student(extra: str) -> None:
    w, out = rw.world_of(64), student_dir(extra)
    if extra in DRAWS:  # training noise: the same world, budget and knobs, another seed (router, noise, LoRA init, triggers)
        folder, n, seed = rw.first_teachers(64, DRAWS[extra]), DRAWS[extra], 1
    else:  # the same teacher files, copied
        folder, n, seed = rw.copy_teachers(w["teachers"], out.parent / "teachers", FIRST + [extra]), 6, 0
    print(eb.stage_distil(folder, w["general"], w["base"], out, seed, **rw.knobs(n, w["cache"])[1]).get("seconds"))


def measure(extras: list, seeds: int = 16) -> None:
    w = rw.world_of(64)
    loras = {"n5": rw.student_dir(64, 5) / "lora"} | {f"plus_{x}": student_dir(x) / "lora" for x in extras if x in OTHERS}
    loras |= {"n10": rw.student_dir(64, 10) / "lora"} | {x: student_dir(x) / "lora" for x in extras if x in DRAWS}
    out = rw.measure_rows(w["base"], w["teachers"], FIRST, loras, seeds)
    for where, r in out.items():
        each, pm = r["effect_replicates"], lambda v: "%+.2f +- %.2f" % eb.mean_se(v)
        print(f"{where}, {seeds} seeds: student - 40-step teacher ({', '.join(f'{k} {v:.2f} dB' for k, v in r['reference'].items())})")
        print(f"  {'':26s} {'mean':>15s}" + "".join(f"{k:>17s}" for k in FIRST))
        for m in loras:
            print(f"  {m:26s} {pm(r['replicates'][m]):>15s}" + "".join(f"{pm(each[m][k]):>17s}" for k in FIRST))
        for m in [m for m in loras if m != "n5"]:  # paired: every row sees the same noise (one training draw each)
            diff = lambda a, b: [x - y for x, y in zip(a, b)]
            print(f"  {m + ' - n5':26s} {pm(diff(r['replicates'][m], r['replicates']['n5'])):>15s}"
                  + "".join(f"{pm(diff(each[m][k], each['n5'][k])):>17s}" for k in FIRST), flush=True)
    path = rw.N10.parent / f"n_step_neighbour_{'_'.join(extras)}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def main(argv: list) -> int:
    torch.set_num_threads(1)
    usage = f"usage: n_step_neighbour.py student EFFECT | measure EFFECT ... (EFFECT one of {', '.join(OTHERS)}; n5_seed1 and " \
            f"n10_seed1: the N = 5 and N = 10 students again, with seed 1)"
    cmd, args = (argv or ["no command"])[0], argv[1:]
    valid = (cmd == "student" and len(args) == 1 or cmd == "measure" and args) and set(args) <= {*OTHERS, *DRAWS}
    need = lambda: [rw.world_of(64)["teachers"]] + ([rw.student_dir(64, n) / "lora" for n in (5, 10)]
                                                    + [student_dir(x) / "lora" for x in args] if cmd == "measure" else [])
    return rw.dispatch(argv, usage, valid, need, lambda: student(*args) if cmd == "student" else measure(args))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
