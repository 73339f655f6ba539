"""Which of its valid outputs each cached teacher target of a multi-modal toy effect lands on: one noise for every source
(collectionlora before commit c774572) against each target its own noise (collectionlora.teacher_target now).

    python examples/target_modes.py [--effect tint_any] [--images 32]

The effect's LoRA and its first K source pictures come from the embedded toy collection (examples/toy/teachers); the teacher
runs as the distiller runs it (40 steps, CFG 1, the base's own scheduler). Prints, per way of drawing the noise, how many
targets land on each valid output (nearest in pixels) and the normalised entropy of that histogram (the bench's coverage).
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402
import effectbench as eb  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    registry = eb.effect_registry()  # name -> (instruction, fn, K)
    multi = [n for n in eb.TOY_EFFECTS if registry[n][2] > 1]
    p.add_argument("--effect", default="tint_any", help=f"a multi-modal effect of the toy collection: {', '.join(multi)}")
    p.add_argument("--images", type=int, default=eb.IMAGES, help=f"its first K source pictures (1..{eb.IMAGES})")
    args = p.parse_args(argv)
    if args.effect not in multi or not 1 <= args.images <= eb.IMAGES:
        p.exit(2, f"error: --effect {args.effect} --images {args.images}: pass one of {', '.join(multi)} and 1..{eb.IMAGES} images\n")
    torch.set_num_threads(1)
    e = eb.Effect(args.effect, *registry[args.effect])
    folder = eb.TOY / "teachers"
    with tempfile.TemporaryDirectory() as tmp, cl.tiny_image_sizes(eb.CONDITION ** 2, eb.SIZE ** 2):
        cfg = cl.Config(teachers=str(folder), base=str(eb.TOY / "base"), out=tmp, guidance=1.0, teacher_steps=40)
        pipe = cl.load_pipeline(cfg.base, torch.device("cpu"), torch.float32)
        pipe.set_progress_bar_config(disable=True)
        effects = cl.read_teachers(folder)
        index = [x.name for x in effects].index(args.effect)
        bank = cl.TeacherBank(effects, pipe, cfg.cache)
        rt = lambda x: eb.unpack(pipe, eb.pack(pipe, x))  # the VAE round trip of a valid output

        def one_noise(path):  # teacher_target before c774572: the teacher from the noise of --seed, whatever the source
            bank.swap(index)
            cl.use_adapter(pipe.transformer, "teacher")
            return cl.sample(pipe, Image.open(path).convert("RGB"), e.instruction, 40, cfg.seed, "latent", 1.0)
        ways = {"one noise for every source": one_noise,
                "its own noise (teacher_target)": lambda path: cl.teacher_target(pipe, bank, index, path, cfg, pipe.scheduler)[0]}
        for way, target in ways.items():
            counts = torch.zeros(e.K, dtype=torch.long)
            for path in effects[index].images[: args.images]:
                x = eb.from_pil(Image.open(path))
                valid = rt(e.outputs(x))                     # (K, 3, H, W)
                out = eb.unpack(pipe, target(path).float())  # (1, 3, H, W)
                counts[eb.distances(out, valid[:, None]).argmin(0)] += 1
            mode = torch.repeat_interleave(torch.arange(e.K), counts)
            print(json.dumps({"effect": args.effect, "noise": way, "targets_per_output": counts.tolist(),
                              "coverage": round(eb.mode_coverage(mode, e.K), 2)}), flush=True)


if __name__ == "__main__":
    main()
