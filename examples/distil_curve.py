"""One distillation of the --quick collection with any collectionlora knobs, and its convergence curve.

    python examples/distil_curve.py NAME '{"warmup": 6000, "max_steps": 7500, "guidance": 1.0}' [--curve_every 500]

The knobs start from effectbench.DISTIL_KNOBS (guidance 2, no warm start, 1,500 iterations unless given); --seed S seeds the
run (LoRA init, router, noise, teacher targets) while the held-out sources stay those of seed 0; --images K gives each
effect K source images (effectbench --images), --sources K adds K more in each effect's sources/ (collectionlora: no
teacher output, the DMD term alone). The run goes to
runs/curves/NAME (teacher targets cached in runs/curves/cache, shared by every run), then the student of every kept
checkpoint is measured like the bench's rows (16 held-out sources x 4 seeds) and printed as one JSON line:
[step, PSNR to the nearest valid output, mode coverage, bad-case ratio, energy score] (curve.json also keeps them per
effect), then the final student's general edits
(effectbench.evaluate_general: [PSNR, bad-case ratio] beside the base's). examples/LAB_NOTES.md's convergence tables came from this.
--general_images N gives the general stream N pictures (the shipped 16, then more train sources, instructions cycled).

    python examples/distil_curve.py s6_x4_nots '{"warmup": 6000, "max_steps": 7500, ...}' --start s5_x4/6000 [--variant fmonly]

--start RUN/STEP continues another run's checkpoint (copied into the new run) with these knobs; --variant patches one
change into collectionlora for this process, for experiments that have no knob: fmonly (DMD and TS terms 0: TA-FM
alone), decay (collectionlora --lr_decay, once a patch: the student's lr falls linearly to 0 after the warm start;
since session 19 DISTIL_KNOBS sets it, so the rows measured at a constant lr need '{"lr_decay": false}'; likewise eight
teacher targets per source since session 23: the earlier rows had '{"targets_per_image": 4}'; and the full phase's lr 3e-5
since session 26: the earlier rows had '{"lr": 1e-4}'), reseed (other noise after the resume),
critic_first (the first 500 steps after the warm start train the critic alone: the fake score learns the student's
samples before DMD follows it), beta1 (the student's Adam beta1 0.9, the official value, after the resume: its
updates average the gradients of about 10 student steps instead of following each batch's), dmd_sigma_uniform / dmd_sigma_low
(the noise level DMD's real and fake scores see, ~ U(0, 1) or U(0, 0.5) instead of U(0, 1) shifted by 3: half its draws
above 0.75, where its step points least towards the truth, examples/diagnose.py), untargeted (with --images K > 32: the
sources past the shipped 32 get no teacher output, never computed; a batch with any of them is trained like the general
stream, DMD alone with the effect's teacher as the real score: what distribution matching can learn from sources alone),
untargeted_half (the same, and half the effect-stream batches, by a coin per step, are drawn from the 32 sources with
teacher outputs: the full objective there), dmd_half (its control without new sources: the same coin, and the other
half of the effect batches trained with DMD alone on the same sources), gt (the teacher outputs replaced by the ground
truth, encoded: does learning from the teachers' samples cost the student?), fm_unshifted (every timestep drawn
unshifted, sigma ~ U(0, 1), as the teachers were trained). Variants combine with "+", e.g. untargeted+reseed.
"""
import argparse
import dataclasses
import json
import random
import shutil
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", help="run folder under runs/curves/")
    p.add_argument("knobs", nargs="?", default="{}", help="collectionlora Config fields as a JSON object")
    p.add_argument("--curve_every", type=int, default=250, help="a checkpoint (a point of the curve) every N iterations")
    p.add_argument("--root", default="runs/curves")
    p.add_argument("--seed", type=int, default=0, help="collectionlora --seed: a replicate of the same run")
    p.add_argument("--images", type=int, default=eb.IMAGES, help="source images per effect (effectbench --images): the shipped 32, "
                   "then more of the world's train sources")
    p.add_argument("--sources", type=int, default=0, help="K more source images per effect in sources/ (collectionlora: no teacher "
                   "output, trained with the DMD term alone): the shipped 32 in images/, then the next K of --images' order")
    p.add_argument("--teachers", default="", help="another --quick teachers folder (e.g. more source images or copies of them)")
    p.add_argument("--general_images", type=int, default=eb.GENERAL, help="pictures of the general stream (the shipped 16, then "
                   "train sources past --images' and the teachers')")
    p.add_argument("--start", default="", help="RUN/STEP: continue from that run's checkpoint (under --root)")
    p.add_argument("--effects", default="", help="comma-separated subset of the --quick effects, e.g. the three one-output ones; "
                   "each keeps its AOP trigger only if every effect sorted before it is kept")
    p.add_argument("--variant", default="", help="a patched change (see above); several joined by +")
    args = p.parse_args(argv)
    if unknown := set(args.variant.split("+")) - set(VARIANTS) - {""}:
        p.error(f"--variant: {', '.join(sorted(unknown))} unknown (choose from {', '.join(VARIANTS)}, joined by +)")
    torch.set_num_threads(1)
    root, knobs = Path(args.root), json.loads(args.knobs)
    teachers, general, base = root / "quick_teachers", eb.TOY / "general", eb.TOY / "base"
    if not teachers.is_dir():
        for n in eb.QUICK_EFFECTS:
            shutil.copytree(eb.TOY / "teachers" / n, teachers / n)
    names = args.effects.split(",") if args.effects else eb.QUICK_EFFECTS
    if unknown := set(names) - set(eb.QUICK_EFFECTS):
        p.error(f"--effects: {', '.join(sorted(unknown))} not in the --quick collection ({', '.join(eb.QUICK_EFFECTS)})")
    world = eb.build_world({n: eb.effect_registry()[n] for n in names}, 0)
    if args.teachers:
        teachers = Path(args.teachers)
    elif args.images != eb.IMAGES or args.sources:
        teachers = eb.with_images(world, teachers, root / f"quick_teachers_img{args.images + args.sources}", args.images + args.sources)
    if args.sources:  # the same pictures, the ones past --images moved to sources/
        split = root / f"quick_teachers_img{args.images}_src{args.sources}"
        for effect in (d for d in sorted(teachers.iterdir()) if d.is_dir() and not (split / d.name).is_dir()):
            tmp = split / (effect.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(effect, tmp)
            (tmp / "sources").mkdir()
            for image in (f for f in sorted((tmp / "images").iterdir()) if int(f.stem) >= args.images):
                image.rename(tmp / "sources" / image.name)
            tmp.rename(split / effect.name)
        teachers = split
    if args.effects:  # a folder of links to the kept effects (teacher LoRAs, targets and inputs are cached by content)
        subset = teachers.parent / f"{teachers.name}_{'-'.join(sorted(names))}"
        subset.mkdir(exist_ok=True)
        for n in names:
            if not (subset / n).exists():
                (subset / n).symlink_to((teachers / n).resolve())
        teachers = subset
    if args.general_images != eb.GENERAL:  # the shipped folder's rule (stage_teachers), continued from the far end of train
        general = root / f"general_{args.general_images}"
        general.mkdir(exist_ok=True)
        for j in range(args.general_images):
            (general / f"{j}.txt").write_text(list(eb.GENERAL_EDITS)[j % len(eb.GENERAL_EDITS)])
            eb.to_pil(world.train[eb.IMAGES + j if j < eb.GENERAL else -1 - j]).save(general / f"{j}.png")
    steps = knobs.pop("max_steps", 1500)
    k = eb.DISTIL_KNOBS | {"max_steps": steps, "guidance": 2.0, "log_every": 250, "save_every": args.curve_every,
                           "keep_checkpoints": steps // args.curve_every + 1, "cache_dir": str(root / "cache")} | knobs
    if {"untargeted", "untargeted_half", "dmd_half"} & set(args.variant.split("+")) and \
            k.get("warmup", 0) > (int(args.start.rsplit("/", 1)[1]) if args.start else 0):  # their batches without a target
        p.error(f"--variant {args.variant}: the warm start (flow matching) needs a teacher output in every batch -- pass "
                '"warmup": 0, or --start from a checkpoint at or past the warm start')
    out, t0 = root / args.name, time.time()
    if args.start and not any((out / "checkpoints").glob("step_*.pt")):
        run, step = args.start.rsplit("/", 1)
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copy(root / run / "checkpoints" / f"step_{int(step):08d}.pt", out / "checkpoints")
    for variant in args.variant.split("+"):
        patch(variant, k["targets_per_image"])
    k["lr_decay"] = k.get("lr_decay", False) or "decay" in args.variant.split("+")  # since session 19 a knob, not a patch
    eb.stage_distil(teachers, general, base, out, args.seed, **k)
    seconds = time.time() - t0
    pipe = eb.load_all(base, world.effects, teachers, {"collectionlora": out / "lora"})
    general_edits = eb.evaluate_general(world, pipe, {"student": ["collectionlora"]}, 4, k["guidance"])["summary"]
    curve = eb.checkpoint_curve(world, world.effects, pipe, out, "collectionlora", seeds=4)
    print(json.dumps({"name": args.name, "knobs": knobs, "distil_seconds": round(seconds),
                      "curve": [(c["step"], round(c["psnr_valid"], 2), round(c["coverage"] or 0, 2), round(c["bad_case"], 3),
                                 c.get("energy") and round(c["energy"], 4))  # None in a curve.json cached before the score
                                for c in curve],
                      "general_edits": {m: (round(r["psnr_valid"], 2), round(r["bad_case"], 3)) for m, r in general_edits.items()}}))


CRITIC_FIRST = 500
VARIANTS = ("fmonly", "decay", "reseed", "critic_first", "beta1", "dmd_sigma_uniform", "dmd_sigma_low", "untargeted", "untargeted_half", "dmd_half", "gt", "fm_unshifted")


def patch(variant: str, targets_per_image: int) -> None:
    """Experiment-only changes without a knob, patched into collectionlora for this process."""
    cl = eb.cl
    if variant == "fmonly":
        cl.dmd_term = lambda transformer, x0_hat, *rest: 0.0 * x0_hat.float().sum()
    elif variant == "critic_first":  # the first CRITIC_FIRST steps after the warm start update the critic alone
        step_of = cl.train_step
        cl.train_step = lambda s, tr, b, sig, o1, o2, cfg, *rest: step_of(s, tr, b, sig, o1, o2, dataclasses.replace(
            cfg, gen_every=10**9) if cfg.warmup <= s < cfg.warmup + CRITIC_FIRST else cfg, *rest)  # no student step there (s > 0)
    elif variant == "beta1":  # Adam's beta1 0.9 for the student after the resume (a checkpoint restores the saved betas)
        load = cl.load_checkpoint
        cl.load_checkpoint = lambda path, tr, o1, o2, gen: (load(path, tr, o1, o2, gen), o1.param_groups[0].update(
            betas=(0.9, o1.param_groups[0]["betas"][1])))[0]
    elif variant.startswith("dmd_sigma_"):  # DMD's noise level (backward and target simulation) ~ U(0, 1) or U(0, 0.5), unshifted
        term, top = cl.dmd_term, 1.0 if variant == "dmd_sigma_uniform" else 0.5
        cl.dmd_term = lambda tr, x0_hat, b, sigma, cfg, gen: term(tr, x0_hat, b, top * torch.rand((), generator=gen, device=gen.device), cfg, gen)
    elif variant.startswith("untargeted") or variant == "dmd_half":  # sources past the shipped IMAGES have no teacher output: DMD alone on them
        target_of, init_of, batch_of, route_of = cl.teacher_target, cl.EditData.__init__, cl.EditData.batch, cl.Router.route

        dmd_only = [False]

        def untargeted(image_path) -> bool:  # with_images names the sources 0.png, 1.png, ...: the shipped ones first
            return int(Path(image_path).stem) >= eb.IMAGES

        def teacher_target(pipe, bank, index, image_path, cfg, teacher_scheduler, j=0, general=""):  # a placeholder, never read
            if index >= 0 and untargeted(image_path):
                y = torch.zeros(cl.cached_encode(pipe, image_path, "", cfg).image_latents.shape)  # the output's shape
                return [y] * cfg.targets_per_image if j is None else y
            return target_of(pipe, bank, index, image_path, cfg, teacher_scheduler, j, general)

        def init(self, *args):  # each pool in the order of the names' numbers: the sources with teacher outputs are pool[:IMAGES]
            init_of(self, *args)
            self.pools = [sorted(pool, key=lambda path: int(path.stem)) for pool in self.pools]

        def batch(self, r, device):
            b = batch_of(self, r, device)
            if dmd_only[0] or r.stream == "effect" and any(untargeted(self.pools[r.effect][s % len(self.pools[r.effect])]) for s in r.sources):
                b.target = None  # no teacher output in this batch: collectionlora's student_loss trains it with the DMD term alone
            return b

        def route(self, step):  # untargeted_half: a coin per step sends the effect batch to the sources with teacher outputs
            r, dmd_only[0] = route_of(self, step), False
            if variant != "untargeted" and r.stream == "effect" and random.Random(f"{self.seed}/targeted/{step}").random() < 0.5:
                n = self.pool_sizes[r.effect] // targets_per_image  # the pool's sources; index s: source s % n, target s // n
                r = r._replace(sources=tuple(s // n * n + s % n % eb.IMAGES for s in r.sources))
            elif variant == "dmd_half" and r.stream == "effect":  # the other half: DMD alone on the same sources
                dmd_only[0] = True  # read by the batch() of this step, called right after
            return r
        cl.teacher_target, cl.EditData.__init__, cl.EditData.batch, cl.Router.route = teacher_target, init, batch, route
    elif variant == "gt":  # the effect's ground truth (its variant j % K) as teacher output j, encoded as a source image is
        target_of, effects = cl.teacher_target, {e.name: e for e in eb.build_world(eb.effect_registry(), 0).effects}

        def teacher_target(pipe, bank, index, image_path, cfg, teacher_scheduler, j=0, general=""):
            if index < 0:  # the general stream's: the base's own edit
                return target_of(pipe, bank, index, image_path, cfg, teacher_scheduler, j, general)
            e, x = effects[bank.effects[index].name], eb.from_pil(Image.open(image_path))
            with torch.no_grad():
                y = [eb.pack(pipe, e.fn(x, k % e.K)[None]).float() for k in (range(cfg.targets_per_image) if j is None else [j])]
            return y if j is None else y[0]  # (1, L, 16) each
        cl.teacher_target = teacher_target
    elif variant == "fm_unshifted":  # every timestep drawn unshifted: the warm start's TA-FM at sigma ~ U(0, 1), as the teachers learnt
        draw = cl.draw_sigma
        cl.draw_sigma = lambda gen, t_min, shift: draw(gen, t_min, 1.0)
    elif variant == "reseed":
        load = cl.load_checkpoint
        cl.load_checkpoint = lambda path, tr, o1, o2, gen: (load(path, tr, o1, o2, gen), gen.manual_seed(12345))[0]


if __name__ == "__main__":
    main()
