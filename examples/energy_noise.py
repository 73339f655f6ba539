"""How far the bench's energy score moves for one fixed model, and rows measured at many sampling seeds.

    python examples/energy_noise.py --bench runs/effectbench/seed0/quick_t600_toy_img240 --seeds 128 \
        --rows teacher_40_g1,teacher_8,fm_teacher_8,collectionlora_8 [--checkpoints RUN/STEP,... --curves runs/curves --seed 3]

The rows of a finished `effectbench.py --quick` run (its teachers, its FM LoRAs, its student and ablations: the table's
names; --student picks the student of an earlier recipe in the same folder, and FM on teacher outputs is the one trained
on that student's data) and any `distil_curve.py` checkpoint (RUN/STEP under --curves, with the prompts of RUN/lora if
the run finished, else the AOP prompts chosen for --seed) are sampled as the bench samples them
(effectbench.energy_replicates), on the same 16 held-out sources, with S seeds per source instead of the bench's 4
(--seeds 4 gives the bench's numbers to every digit). Printed per row: the energy score over all S seeds, and the S/4 replicates of the bench's own 4-seed number
(mean, sd, range: how far one bench number moves for the same model), per effect; for a multi-modal effect, how often
each valid output is the nearest and how unevenly per source (total variation from 1/K, averaged over sources: about
0.06 at 128 seeds for perfectly even samples); then every pair of rows, their difference with a standard error from the
paired replicates. --out keeps every number (JSON); --earlier adds the rows of earlier --out files to the report, paired
exactly (the noise draws are fixed). examples/LAB_NOTES.md, "The energy score's noise (session 22)", came from this.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch
from peft.utils import set_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402


def refuse(message: str) -> None:
    """Bad input: one line on stderr and exit code 2, as the CLIs here do."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def rows_of(bench: Path, curves: Path, checkpoints: list, seed: int, name: str = "") -> tuple:
    """({adapter: folder}, {checkpoint adapter: state file}, {row: Method}) for a --quick bench folder and curve checkpoints;
    the student: the distil_* folder `name`, or the newest finished one."""
    if not bench.is_dir():
        refuse(f"--bench '{bench}' is not a folder -- pass an effectbench.py --quick run's <root>/seed0/quick_t600_toy_img240")
    students = sorted((d for d in bench.glob("distil_*") if (d / "lora").is_dir()), key=lambda d: d.stat().st_mtime)
    full = [d for d in students if "_no_" not in d.name and "_dmd_only" not in d.name]  # not an ablation
    main = [d for d in full if d.name == (name or d.name)]
    if not main:
        refuse(f"--bench '{bench}' holds no finished distillation {name or 'distil_*'}/lora -- "
               + (f"pass one of {', '.join(d.name for d in full)} to --student" if name and full else "run effectbench.py --quick first"))
    student = main[-1]
    print(f"the student: {student.name}")
    config = json.loads((student / "lora" / "collectionlora.json").read_text())["config"]  # FM on the student's own data:
    same = f"fm_teacher_lora_g{config['guidance']:g}_k{config['targets_per_image']}"  # effectbench's name for it
    fm_teacher = [d for d in sorted(bench.glob(same + "*")) if d.name == same or d.name.startswith(same + "_")]
    loras = {"collectionlora": student / "lora", "fm_baseline": bench / "fm_lora",
             "fm_teacher": fm_teacher[0] if fm_teacher else bench / "fm_teacher_lora"}
    print(f"FM on teacher outputs: {loras['fm_teacher'].name}")
    loras |= {d.name[len(student.name) + 1:]: d / "lora" for d in students if d.name.startswith(student.name + "_")}
    loras = {k: v for k, v in loras.items() if v.is_dir()}
    prompts, own, M = eb.student_prompts(student / "lora"), (lambda e: [e.name]), eb.Method
    methods = {f"teacher_40_g{g:g}": M(own, None, g) for g in (1.0, 2.0, 3.0, 5.0)} | {"teacher_8": M(own)}
    methods |= {"fm_8": M(lambda e: ["fm_baseline"], prompts), "fm_teacher_8": M(lambda e: ["fm_teacher"], prompts),
                "collectionlora_8": M(lambda e: ["collectionlora"], prompts)}
    methods |= {f"{a}_8": M(lambda e, a=a: [a], eb.student_prompts(loras[a])) for a in loras if a.startswith(("no_", "dmd_"))}
    states, theirs = {}, eb.planned_prompts(bench / "teachers", eb.TOY / "base", seed) if checkpoints else {}
    for i, ck in enumerate(checkpoints):  # a checkpoint's student, loaded into a copy of the bench student's adapter
        run, step = ck.rsplit("/", 1)
        states[f"ck{i}"] = curves / run / "checkpoints" / f"step_{int(step):08d}.pt"
        if not states[f"ck{i}"].is_file():
            refuse(f"--checkpoints '{ck}': no {states[f'ck{i}']} -- pass RUN/STEP of a run under --curves")
        own_prompts = curves / run / "lora" / "collectionlora.json"  # a finished run's own (e.g. --no-aop: the instructions)
        loras[f"ck{i}"], methods[ck] = student / "lora", M(lambda e, a=f"ck{i}": [a],
                                                           eb.student_prompts(own_prompts.parent) if own_prompts.is_file() else theirs)
    return loras, states, methods


def report(results: dict) -> list:
    mean = lambda v: sum(v) / len(v)
    sd = lambda v: math.sqrt(sum((x - mean(v)) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else math.nan  # one replicate: none
    lines = ["| row | energy, all seeds | the bench's 4-seed number: mean / sd / range | per effect: all seeds (sd of its 4-seed number) "
             "| multi-modal: shares of the valid outputs, per-source imbalance |", "|---|---|---|---|---|"]
    for m, per in results.items():
        b = eb.row_replicates(results, m)
        modal = "; ".join(f"{e} {[round(s, 3) for s in r['shares']]}, {r['imbalance']:.3f}" for e, r in per.items() if "shares" in r)
        lines.append(f"| {m} | {mean([r['pooled'] for r in per.values()]):.4f} | {mean(b):.4f} / {sd(b):.4f} / {min(b):.4f}-{max(b):.4f} | "
                     + ", ".join(f"{e} {r['pooled']:.4f} ({sd(r['replicates']):.4f})" for e, r in per.items()) + f" | {modal} |")
    lines += ["", "| row - row | difference (all seeds) | standard error | per effect |", "|---|---|---|---|"]
    names = list(results)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            diff, se = eb.energy_difference(results, a, b)
            per = ", ".join(f"{e} {results[a][e]['pooled'] - results[b][e]['pooled']:+.4f}" for e in results[a])
            lines.append(f"| {a} - {b} | {diff:+.4f} | {se:.4f} | {per} |")
    return lines


def read_earlier(files: str, seeds: int) -> list:
    """--earlier: [(file name, its rows)] of earlier --out files, checked before any sampling. Measured at the same --seeds,
    their rows pair exactly with this run's (the noise draws are fixed), so the differences span runs."""
    earlier = []
    for f in (f for f in files.split(",") if f):
        try:
            data = json.loads(Path(f).read_text())
            theirs, rows = data["args"]["seeds"], data["results"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            refuse(f"--earlier {f} is not an --out file of this script ({type(e).__name__}: {e}) -- pass one")
        if theirs != seeds:
            refuse(f"--earlier {f} was measured at --seeds {theirs}, this run at {seeds} -- pass --seeds {theirs} to pair them")
        earlier.append((Path(f).stem, rows))
    return earlier


def merge(results: dict, earlier: list) -> dict:
    """This run's rows, then the earlier files' (a name already taken gets its file's name in front: <file>:<row>)."""
    merged = dict(results)
    for stem, rows in earlier:
        merged |= {name if name not in merged else f"{stem}:{name}": per for name, per in rows.items()}
    return merged


def bench_flags(p: argparse.ArgumentParser, rows: str) -> None:
    """The flags this script and roll_errors.py share: a bench run, its rows, and checkpoints."""
    p.add_argument("--bench", required=True, help="a finished effectbench --quick folder: <root>/seed0/quick_t600_toy_img<K>")
    p.add_argument("--student", default="", help="the bench's distil_* folder of the student row (default: the newest finished)")
    p.add_argument("--rows", default=rows, help="comma-separated table rows")
    p.add_argument("--checkpoints", default="", help="comma-separated RUN/STEP of distil_curve.py runs under --curves")
    p.add_argument("--curves", default="runs/curves", help="distil_curve.py's --root")
    p.add_argument("--seed", type=int, default=0, help="the --seed the checkpoints' runs were made with (their AOP prompts)")
    p.add_argument("--out", default="", help="write every number here (JSON)")


def load_rows(args) -> tuple:
    """(the --quick world, the pipeline with every adapter loaded, {row: Method} of --rows then --checkpoints)."""
    torch.set_num_threads(1)
    bench, checkpoints = Path(args.bench), [c for c in args.checkpoints.split(",") if c]
    world = eb.build_world({n: eb.effect_registry()[n] for n in eb.QUICK_EFFECTS}, 0)
    loras, states, methods = rows_of(bench, Path(args.curves), checkpoints, args.seed, args.student)
    if unknown := [r for r in args.rows.split(",") if r and r not in methods]:
        refuse(f"--rows: {', '.join(unknown)} not in this bench folder (it has {', '.join(m for m in methods if m not in checkpoints)})")
    pipe = eb.load_all(eb.TOY / "base", world.effects, bench / "teachers", loras)
    for adapter, state in states.items():
        set_peft_model_state_dict(pipe.transformer, torch.load(state, weights_only=True)["student"], adapter_name=adapter)
    return world, pipe, {m: methods[m] for m in [r for r in args.rows.split(",") if r] + checkpoints}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    bench_flags(p, "teacher_40_g1,teacher_8,fm_teacher_8,collectionlora_8")
    p.add_argument("--seeds", type=int, default=128, help="sampling seeds per held-out source (a multiple of 4; the bench: 4)")
    p.add_argument("--earlier", default="", help="comma-separated --out files of earlier runs at the same --seeds: their rows "
                   "join the report, each pair of rows with its paired difference (--out keeps this run's rows only)")
    args = p.parse_args(argv)
    if args.seeds < 4 or args.seeds % 4:
        refuse(f"--seeds {args.seeds}: pass a multiple of 4 (each 4 seeds are one replicate of the bench's number)")
    earlier = read_earlier(args.earlier, args.seeds)
    world, pipe, chosen = load_rows(args)
    results = eb.energy_replicates(world, world.effects, pipe, chosen, args.seeds)
    print("\n".join(report(merge(results, earlier))))
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))


if __name__ == "__main__":
    main()
