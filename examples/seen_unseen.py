"""Is a --quick student short of data? Its gap to the teacher on sources it trained on, on sources only the teachers saw, and
on the held-out ones.

    python examples/seen_unseen.py runs/curves/n240 [--fm runs/effectbench/seed0/quick_t600_toy/fm_teacher_lora_g1_k4]

RUN is a distil_curve.py (or effectbench) distillation of the four --quick effects. The same rows as the bench (teacher 40
steps at CFG 1, teacher 8 plain steps, the student; FM on teacher outputs with --fm), measured like the bench's rows on 16
sources x 4 seeds, on three source sets: train[0:16] (every effect's first 16 images: the student trained on them),
train[64:80] (the teachers trained on them; the student too with --images 64 or more) and the held-out sources. Prints
one JSON line per set: {row: [PSNR to the nearest valid output, coverage, bad-case ratio, dB below the teacher]}.
"""
import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a distillation's folder (with lora/) of the --quick effects")
    p.add_argument("--fm", default="", help="also this FM LoRA folder, with the student's prompts")
    args = p.parse_args(argv)
    if not (Path(args.run) / "lora" / "pytorch_lora_weights.safetensors").is_file():
        p.exit(2, f"error: RUN '{args.run}' has no lora/pytorch_lora_weights.safetensors -- pass a finished distillation's "
                  f"folder (distil_curve.py writes runs/curves/NAME)\n")
    if args.fm and not (Path(args.fm) / "pytorch_lora_weights.safetensors").is_file():
        p.exit(2, f"error: --fm '{args.fm}' has no pytorch_lora_weights.safetensors -- pass an FM LoRA folder "
                  f"(effectbench --quick writes runs/effectbench/seed0/quick_t600_toy/fm_teacher_lora_g1_k4)\n")
    torch.set_num_threads(1)
    world = eb.build_world({n: eb.effect_registry()[n] for n in eb.QUICK_EFFECTS}, 0)
    student = Path(args.run) / "lora"
    loras = {"collectionlora": student} | ({"fm_teacher": Path(args.fm)} if args.fm else {})
    pipe = eb.load_all(eb.TOY / "base", world.effects, eb.TOY / "teachers", loras)
    prompts = eb.student_prompts(student)
    methods = {"teacher_40_g1": eb.Method(lambda e: [e.name], None, 1.0), "teacher_8": eb.Method(lambda e: [e.name])}
    methods |= {f"{name}_8": eb.Method(lambda e, name=name: [name], prompts) for name in loras}
    for label, sources in (("train[0:16]", world.train[:16]), ("train[64:80]", world.train[64:80]), ("held-out", world.test)):
        results = eb.evaluate(dataclasses.replace(world, test=sources), world.effects, pipe, methods, 4, "teacher_40_g1", True)
        rows = eb.summarise(results["results"], list(methods))
        best = rows["teacher_40_g1"]["psnr_valid"]
        print(json.dumps({"sources": label} | {m: [round(r["psnr_valid"], 2), round(r["coverage"] or 0, 2), round(r["bad_case"], 3),
                                                   round(best - r["psnr_valid"], 2)] for m, r in rows.items()}), flush=True)


if __name__ == "__main__":
    main()
