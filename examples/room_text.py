"""Is N's cost the text channel? The step from N = 5 to N = 10 effects on the toy base with a text encoder 4x as wide
(or, with a leading `--width W`, W wide: `python examples/room_text.py --width 256 base`, and so on; each width its own
world beside the others, runs/text/seed0/*_t<W>*).

    python examples/room_text.py base          # runs/text/seed0/base_t64 (a few minutes of a core)
    python examples/room_text.py teachers 0    # its teachers of the first 10 effects, half each, then `teachers 2`:
    python examples/room_text.py teachers 1    #   general/ and 64 sources each
    python examples/room_text.py student 5     # the first 5 / 10 effects at 1,200 warm-start + 50 full iterations per
    python examples/room_text.py student 10    #   effect, the bench's knobs
    python examples/room_text.py measure       # 16 seeds, the first 5 effects, both source sets
    python examples/room_text.py student 5 1; python examples/room_text.py student 10 1   # a second training draw (seed 1)
    python examples/room_text.py measure 0 1   # both draws

examples/room_width.py made the transformer twice as wide and the step stayed. What it kept is the text channel: every
student reads its N prompts through the toy's random text encoder, 16 numbers per token, and its chosen prompts sit at
cosines of 0.92-0.94 to each other (AOP's measure). Here the text encoder is 64 wide (8 heads of 8, the transformer's
joint_attention_dim 64); the transformer (width 64, 3 layers), VAE (copied; checked equal) and tokenizer are the toy's,
pretrained as the toy was. If the text channel sets N's cost, the step from N = 5 to N = 10 shrinks here. `measure`
prints it as examples/room_width.py does (student - 40-step teacher, four 4-seed replicates) and writes
runs/text/room_text.json (room_text_w<W>.json at another width; _0_1 for two draws).
"""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402
import room_width as rw  # noqa: E402

HOME = Path("runs/text/seed0")
WIDTH = 64  # main() sets it from --width


def paths(width: int) -> tuple:
    """The world of a text width: its base, trained teachers, general edits and the folder of its 64-source teachers and students."""
    return (HOME / f"base_t{width}", HOME / f"n10_t600_t{width}" / "teachers", HOME / f"n10_t600_t{width}" / "general",
            HOME / f"n10_t600_t{width}_img64")


def teachers(j: int) -> None:
    """As the bench's setup(): stage_teachers (j = 0, 1: half of them each; 2: all cached, then general/), with_images(64)."""
    world, (base, trained, general, folder) = eb.build_world({k: eb.effect_registry()[k] for k in rw.NAMES}, 0), paths(WIDTH)
    eb.check_registry(world.effects, world.test[:8])
    eb.stage_teachers(world, world.effects, base, trained, general, 600, 0, part=(j, 2) if j < 2 else (0, 1))
    if j == 2:
        eb.with_images(world, trained, folder / "teachers", 64)


def student_dir(n: int, seed: int = 0) -> Path:
    """The student of the first n effects (another seed: a second training draw; its router, noise, LoRA init, triggers
    and teacher targets)."""
    folder = paths(WIDTH)[3]
    home = folder if n == 10 else folder.with_name(f"{folder.name}_first{n}")
    return home / (rw.knobs(n, folder / "cache")[0] + f"_seed{seed}" * (seed > 0))


def student(n: int, seed: int = 0) -> None:
    (base, _, general, folder), out = paths(WIDTH), student_dir(n, seed)
    # N < 10: the first n teachers, the same files, copied beside it
    mine = folder / "teachers" if n == 10 else rw.copy_teachers(folder / "teachers", out.parent / "teachers", rw.NAMES[:n])
    print(eb.stage_distil(mine, general, base, out, seed, **rw.knobs(n, folder / "cache")[1]).get("seconds"))


def measure(*draws: int, seeds: int = 16) -> None:
    base, _, _, folder = paths(WIDTH)
    loras = {f"n{n}" + f"_seed{d}" * (d > 0): student_dir(n, d) / "lora" for d in draws or (0,) for n in (5, 10)}
    out = {}
    for where, r in rw.measure_rows(base, folder / "teachers", rw.NAMES[:5], loras, seeds, teacher_8=True).items():
        gap = r["replicates"] | {f"n10{s} - n5{s}": [a - b for a, b in zip(r["replicates"][f"n10{s}"], r["replicates"][f"n5{s}"])]
                                 for s in (f"_seed{d}" * (d > 0) for d in draws or (0,))}
        out[where] = r | {"replicates": gap}
        print(f"text width {WIDTH}, {where}: the 40-step teacher {sum(r['reference'].values()) / 5:.2f} dB")
        for m, v in gap.items():
            print(f"  {m:14s} {'%+.2f +- %.2f' % eb.mean_se(v)} (replicates " + " ".join(f"{x:+.2f}" for x in v) + ")"
                  + "".join(f"  {k} {x:+.2f}" for k, x in r["per_effect"].get(m, {}).items()), flush=True)
    name = f"room_text{f'_w{WIDTH}' * (WIDTH != 64)}{''.join(f'_{d}' for d in draws if draws != (0,))}.json"
    (HOME.parent / name).write_text(json.dumps(out, indent=1))


def main(argv: list) -> int:
    global WIDTH
    torch.set_num_threads(1)
    usage = ("usage: room_text.py [--width W] base | teachers J (0, 1, 2) | student N [SEED] (N 5 or 10) | measure [SEED ...] "
             "(default 0); W a multiple of 8 from 16 to 1024, default 64")
    given, argv = argv, argv[2:] if argv[:1] == ["--width"] else argv
    WIDTH = (int(given[1]) if given[1:2] and given[1].isdigit() else -1) if argv is not given else 64
    cmd, args = (argv or ["no command"])[0], [int(a) if a.isdigit() else -1 for a in argv[1:]]
    valid = {"base": args == [], "teachers": args in ([0], [1], [2]), "measure": all(a >= 0 for a in args),
             "student": len(args) in (1, 2) and args[0] in (5, 10) and all(a >= 0 for a in args)}
    base, _, _, folder = paths(WIDTH)
    need = lambda: {"base": [], "teachers": [base], "student": [folder / "teachers"],
                    "measure": [student_dir(n, d) / "lora" for d in args or [0] for n in (5, 10)]}[cmd]
    build_base = lambda: rw.build_base(base, heads=4, text_width=WIDTH)
    return rw.dispatch(given, usage, valid.get(cmd) and WIDTH in range(16, 1025, 8), need, lambda: {
        "base": build_base, "teachers": teachers, "student": student, "measure": measure}[cmd](*args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
