"""Does N's cost follow the learning rate? The step from N = 5 to N = 10 effects at one budget per effect, with the warm
start's lr (--warmup_lr, 1e-3 on the bench, falling linearly to 0) changed.

    python examples/n_step_lr.py student 10 2e-3 1     # the first N = 5 or 10 effects, warm-start lr, warm-start length
    python examples/n_step_lr.py student 5 2e-3 1      #   as a multiple of the bench's 1,200 iterations per effect
    python examples/n_step_lr.py measure 1e-3:1 2e-3:1 5e-4:2   # 16 seeds, the first 5 effects, both source sets

The world is the bench's N = 10 world of examples/room_width.py (width 64; build it as its docstring says) and lr 1e-3 at
length 1 are room_width.py's own width-64 students. Sessions 32-35 found that the step does not shrink with room and that
long blocks of one edit cost more (the router's period). If N's cost is the other edits' updates pushing an edit's fit
away (a floor that scales with the step size), the step grows with the lr and shrinks with a smaller lr at matched
progress (half the lr, twice the iterations). If it is a fit the student cannot reach at any lr, the step does not move.
`measure` prints, per lr and length, N = 5 and N = 10 minus the 40-step teacher (CFG 1) in nearest-valid PSNR as four
4-seed replicates (± one standard error) and the step between them, and writes runs/n10/n_step_lr_<variants>.json.
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402
import room_width as rw  # noqa: E402


def student_dir(n: int, lr: float, length: int) -> tuple:
    """(folder, knobs) of the N = n student at warm-start lr `lr` and `length` x 1,200 warm-start iterations per effect."""
    w = rw.world_of(64)
    name, knobs = rw.knobs(n, w["cache"], per_warm=1200 * length)
    folder = (w["home"] if n == 10 else w["home"].with_name(f"{w['home'].name}_first{n}")) / (name + f"_wlr{lr:g}" * (lr != 1e-3))
    return folder, knobs | {"warmup_lr": lr}


def student(n: int, lr: float, length: int) -> None:
    w, (out, knobs) = rw.world_of(64), student_dir(n, lr, length)
    print(eb.stage_distil(rw.first_teachers(64, n), w["general"], w["base"], out, 0, **knobs).get("seconds"))


def tag(lr: float, length: int) -> str:
    return f"{lr:g}x{length}".replace(".", "p")  # an adapter name: no dots


def measure(variants: list, seeds: int = 16) -> None:
    w, names = rw.world_of(64), rw.NAMES[:5]
    loras = {f"n{n}_{tag(lr, length)}": student_dir(n, lr, length)[0] / "lora" for lr, length in variants for n in (5, 10)}
    out = {"variants": variants}
    for where, r in rw.measure_rows(w["base"], w["teachers"], names, loras, seeds).items():
        steps = {tag(lr, k): [b - a for a, b in zip(r["replicates"][f"n5_{tag(lr, k)}"], r["replicates"][f"n10_{tag(lr, k)}"])]
                 for lr, k in variants}
        out[where] = r | {"steps": steps}
        print(f"{where}: the 40-step teacher {sum(r['reference'].values()) / len(names):.2f} dB; student - teacher, {seeds} seeds")
        for lr, k in variants:
            cells = [f"N = {n} {'%+.2f +- %.2f' % eb.mean_se(r['replicates'][f'n{n}_{tag(lr, k)}'])}" for n in (5, 10)]
            print(f"  warm-start lr {lr:g}, {1200 * k} per effect: " + ", ".join(cells)
                  + f", step {'%+.2f +- %.2f' % eb.mean_se(steps[tag(lr, k)])}", flush=True)
        (lr0, k0), paired = variants[0], lambda a, b: "%+.2f +- %.2f" % eb.mean_se([x - y for x, y in zip(a, b)])
        for lr, k in variants[1:]:  # the same noise in every row: paired (one training draw each: not its noise)
            a, b = tag(lr, k), tag(lr0, k0)
            print(f"  {a} - {b}: N = 5 {paired(r['replicates'][f'n5_{a}'], r['replicates'][f'n5_{b}'])}, N = 10 "
                  f"{paired(r['replicates'][f'n10_{a}'], r['replicates'][f'n10_{b}'])}, step {paired(steps[a], steps[b])}")
    path = rw.N10.parent / f"n_step_lr_{'_'.join(tag(lr, k) for lr, k in variants)}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


def main(argv: list) -> int:
    torch.set_num_threads(1)
    usage = "usage: n_step_lr.py student N LR LENGTH | measure LR:LENGTH ... (N 5 or 10, LR > 0, LENGTH 1 to 8)"
    cmd, args = (argv or ["no command"])[0], None
    try:  # student N LR LENGTH, or measure LR:LENGTH ...
        if cmd == "student" and len(argv) == 4 and int(argv[1]) in (5, 10) and float(argv[2]) > 0 and 1 <= int(argv[3]) <= 8:
            args = [int(argv[1]), float(argv[2]), int(argv[3])]
        elif cmd == "measure" and len(argv) > 1:
            args = [[(float(lr), int(k)) for lr, k in (a.split(":") for a in argv[1:])]]
            args = args if all(lr > 0 and 1 <= k <= 8 for lr, k in args[0]) else None
    except ValueError:
        pass
    need = lambda: [rw.world_of(64)["teachers"]] + ([student_dir(n, lr, k)[0] / "lora" for lr, k in args[0] for n in (5, 10)]
                                                    if cmd == "measure" else [])
    return rw.dispatch(argv, usage, args is not None, need, lambda: {"student": student, "measure": measure}[cmd](*args))

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
