"""Is N's cost room in the one LoRA? The step from N = 5 to N = 10 effects, at one budget per effect, on the toy base
and on a base twice as wide.

    python examples/room_width.py base                 # the wide base: runs/wide/seed0/base_w128 (about 8 min of a core)
    python examples/room_width.py teachers 0           # its teachers of the first 10 effects, half each (about 10 min
    python examples/room_width.py teachers 1           #   of a core each), then `teachers 2`: general/ and 64 sources each
    python examples/room_width.py student 64 5         # width 64 or 128, the first N = 5 or 10 effects (N = 10 at width 64
    python examples/room_width.py measure 64           #   is the bench's own); then 16 seeds on both source sets
    python examples/room_width.py student 128 10 128   # a third number: the student's rank (default 64; 128 at width 128
    python examples/room_width.py measure 128 128      #   is full rank)

At width 64 the toy's rank-64 student LoRA is full rank, and sessions 32-34 read N's cost (about 0.44 dB per doubling of
N, set by the distinct edits) as room. Here the base's transformer is twice as wide (hidden 128: 8 heads of 16, 1.87M
parameters against 0.48M); everything else is the toy's: the same VAE, tokenizer and text encoder (copied; `base` checks
them equal), the same pretraining (2,500 flow-matching steps at lr 1e-3 on the general edits), the bench's teachers
(ranks 4 / 8 / 16, 600 steps), 64 sources per effect and the bench's student knobs (rank 64: at width 128 three times the
degrees of freedom per attention matrix). Both students of a width get 1,200 warm-start + 50 full iterations per effect
and are measured on the first 5 effects. If room sets N's cost, the step from N = 5 to N = 10 is smaller at width 128.

Width 64 is the N = 10 world of the bench, built first by
    python examples/effectbench.py --effects 10 --base examples/toy/base --images 64 --warmup_steps 12000 --distil_steps 500 \
        --fm_steps 150 --no-ablations --seeds 4 --energy_seeds 0 --jobs 1 --root runs/n10
whose student is N = 10 at this budget. `measure W` prints, per row, student minus the 40-step teacher (CFG 1) in
nearest-valid PSNR over 16 seeds as four 4-seed replicates (± one standard error), on the held-out sources and on
train[0:16] (sources every student trained on), and writes runs/wide/room_w<W>_r<R>.json.
"""
import dataclasses
import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402

NAMES = list(eb.effect_registry())[:10]
N10, WIDE = Path("runs/n10/seed0"), Path("runs/wide/seed0")


def world_of(width: int) -> dict:
    """Each width's base, teachers with 64 sources (as the bench's --images 64 writes them), general edits and target cache."""
    if width == 64:  # the bench's N = 10 run above
        home = N10 / "n10_t600_toy_img64"
        return {"base": Path("examples/toy/base"), "teachers": home / "teachers", "general": N10 / "n10_t600_toy" / "general",
                "cache": home / "cache", "home": home}
    home = WIDE / "n10_t600_w128_img64"
    return {"base": WIDE / "base_w128", "teachers": home / "teachers", "general": WIDE / "n10_t600_w128" / "general",
            "cache": home / "cache", "home": home, "trained": WIDE / "n10_t600_w128" / "teachers"}


def knobs(n: int, cache: Path, rank: int = 64, per_warm: int = 1200, per_full: int = 50) -> tuple:
    """The bench's distillation of n effects at per_warm warm-start + per_full full iterations per effect: (folder name, knobs)."""
    warmup, steps = per_warm * n, (per_warm + per_full) * n
    every = max(math.ceil(steps / 6), 1)
    return f"distil_w{warmup}_{steps}_g1_lr3e-05_k8_fm1_gw_decay" + f"_r{rank}" * (rank != 64), eb.DISTIL_KNOBS | {
        "rank": rank, "alpha": rank, "max_steps": steps, "warmup": warmup, "guidance": 1.0, "log_every": 250,
        "save_every": every, "keep_checkpoints": steps // every + 1, "cache_dir": str(cache)}


def student_dir(width: int, n: int, rank: int = 64) -> Path:
    w = world_of(width)
    return (w["home"] if n == 10 else w["home"].with_name(f"{w['home'].name}_first{n}")) / knobs(n, w["cache"], rank)[0]


def build_base(folder: Path = WIDE / "base_w128", heads: int = 8, text_width: int = 16) -> None:
    """A toy base of another size: the transformer `heads` heads of 16 wide (3 layers, as the toy), the text encoder
    text_width wide; the toy's trained VAE (not trained again) and tokenizer, pretrained as the toy was. Checks that the
    VAE and tokenizer (and the text encoder, where it is the toy's width) equal the toy base's."""
    from diffusers import QwenImageTransformer2DModel
    toy = eb.load_base(Path("examples/toy/base"))
    transformer = lambda: QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                                                      num_attention_heads=heads, joint_attention_dim=text_width, axes_dims_rope=(8, 4, 4))
    print(eb.stage_base(eb.build_world(eb.effect_registry(), 0), folder, 0, 4000, 2500, toy.vae, transformer, text_width))
    new = eb.load_base(folder)
    for part in ("vae", "text_encoder")[: 2 if text_width == 16 else 1]:
        a, b = getattr(toy, part).state_dict(), getattr(new, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert toy.tokenizer.get_vocab() == new.tokenizer.get_vocab()
    count = lambda pipe: sum(p.numel() for p in pipe.transformer.parameters())
    width = lambda pipe: pipe.text_encoder.config.text_config.hidden_size
    print(f"oracle: VAE, tokenizer{' and text encoder' * (text_width == 16)} equal the toy base's; transformer "
          f"{count(toy):,} -> {count(new):,} parameters; text encoder width {width(toy)} -> {width(new)}")


def copy_teachers(source: Path, folder: Path, names: list) -> Path:
    """folder/<name> for each name: the same teacher files as source/<name>, copied (once; atomically)."""
    if not folder.is_dir():
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for k in names:
            shutil.copytree(source / k, tmp / k)
        tmp.rename(folder)
    return folder


def measure_rows(base: Path, teachers: Path, names: list, loras: dict, seeds: int, teacher_8: bool = False) -> dict:
    """The experiment scripts' measurement: on the first `names` effects, every student (loras: row -> its lora folder,
    the row name also its adapter's) against the 40-step teacher at CFG 1 [and the teachers' 8 plain steps], as
    effectbench.psnr_replicates samples, on the held-out sources and on train[0:16] (sources every student trained on):
    {"held_out": its result, "train": its result}."""
    world = eb.build_world({k: eb.effect_registry()[k] for k in names}, 0)
    pipe = eb.load_all(base, world.effects, teachers, loras)
    methods = {"teacher_40_g1": eb.Method(lambda e: [e.name], None, 1.0)} | (
        {"teacher_8": eb.Method(lambda e: [e.name])} if teacher_8 else {}) | {
        m: eb.Method(lambda e, m=m: [m], eb.student_prompts(lora)) for m, lora in loras.items()}
    return {where: eb.psnr_replicates(wo, wo.effects, pipe, methods, seeds, "teacher_40_g1")
            for where, wo in (("held_out", world), ("train", dataclasses.replace(world, test=world.train[:16])))}


def teachers(j: int) -> None:
    """As the bench's setup(): stage_teachers (j = 0, 1: half of them each; 2: all cached, then general/), with_images(64)."""
    w, world = world_of(128), eb.build_world({k: eb.effect_registry()[k] for k in NAMES}, 0)
    eb.check_registry(world.effects, world.test[:8])
    eb.stage_teachers(world, world.effects, w["base"], w["trained"], w["general"], 600, 0, part=(j, 2) if j < 2 else (0, 1))
    if j == 2:
        eb.with_images(world, w["trained"], w["teachers"], 64)
        assert [e.name for e in eb.cl.read_teachers(w["teachers"])] == sorted(NAMES)


def first_teachers(width: int, n: int) -> Path:
    """The teachers folder of the first n effects: the same files, copied beside the N < 10 students."""
    w = world_of(width)
    return w["teachers"] if n == 10 else copy_teachers(w["teachers"], w["home"].with_name(f"{w['home'].name}_first{n}") / "teachers",
                                                       NAMES[:n])


def student(width: int, n: int, rank: int = 64) -> None:
    w, out = world_of(width), student_dir(width, n, rank)
    print(eb.stage_distil(first_teachers(width, n), w["general"], w["base"], out, 0, **knobs(n, w["cache"], rank)[1]).get("seconds"))


def measure(width: int, rank: int = 64, seeds: int = 16) -> None:
    w, loras = world_of(width), {f"n{n}_8": student_dir(width, n, rank) / "lora" for n in (5, 10)}
    out = {}
    for where, r in measure_rows(w["base"], w["teachers"], NAMES[:5], loras, seeds, teacher_8=True).items():
        gap = r["replicates"] | {"n10_8 - n5_8": [a - b for a, b in zip(r["replicates"]["n10_8"], r["replicates"]["n5_8"])]}
        out[where] = {"replicates": gap, "teacher_40_g1": r["reference"], "per_effect": r["per_effect"]}
        print(f"width {width}, student rank {rank}, {where}: the 40-step teacher {statistics.mean(r['reference'].values()):.2f} dB")
        for m, v in gap.items():
            print(f"  {m:14s} {'%+.2f +- %.2f' % eb.mean_se(v)} (replicates " + " ".join(f"{x:+.2f}" for x in v) + ")"
                  + "".join(f"  {k} {x:+.2f}" for k, x in r["per_effect"].get(m, {}).items()), flush=True)
    WIDE.parent.mkdir(parents=True, exist_ok=True)
    (WIDE.parent / f"room_w{width}_r{rank}.json").write_text(json.dumps(out, indent=1))


def main(argv: list) -> int:
    torch.set_num_threads(1)
    usage = "usage: room_width.py base | teachers J (0, 1, 2) | student W N [R] | measure W [R] (W 64 or 128, N 1 to 10, rank R default 64)"
    cmd, args = (argv or ["no command"])[0], [int(a) if a.isdigit() else -1 for a in argv[1:]]
    rank_ok = lambda a: 1 <= (a or [64])[0] <= 512  # the optional rank, if given
    valid = {"base": args == [], "teachers": args in ([0], [1], [2]),
             "student": len(args) in (2, 3) and args[0] in (64, 128) and 1 <= args[1] <= 10 and rank_ok(args[2:]),
             "measure": len(args) in (1, 2) and args[0] in (64, 128) and rank_ok(args[1:])}
    need = lambda: ([world_of(64)["teachers"] if 64 in args[:1] else world_of(128)["base"]] if cmd != "base" else []) + (
        [student_dir(args[0], n, *args[1:]) / "lora" for n in (5, 10)] if cmd == "measure" else [])
    return dispatch(argv, usage, valid.get(cmd), need, lambda: {"base": build_base, "teachers": teachers, "student": student,
                                                                "measure": measure}[cmd](*args))


def dispatch(argv: list, usage: str, valid: bool, need, run) -> int:
    """The experiment scripts' command line: a bad command, or an input not built yet (need(): the paths it reads), is one
    line and exit code 2; else run() it."""
    if not valid:
        print(f"error: {' '.join(argv) or 'no command'} -- {usage}", file=sys.stderr)
        return 2
    for path in (p for p in need() if not p.exists()):
        print(f"error: '{path}' is missing -- build it first (see the usage at the top of {Path(sys.argv[0]).name})", file=sys.stderr)
        return 2
    run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
