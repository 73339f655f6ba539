"""Do teachers that need CFG open a gap between a teacher's 8 plain steps and its 40 steps with CFG? (issue 11, part 2)

    python examples/teacher_samplers.py cfg      # 5 ways of training the teachers x 6 effects, each at 40 steps x CFG g and at 8
    python examples/teacher_samplers.py mmse     # the embedded toy teachers: 40 steps, 40 steps ending on x0 at sigma 0.3, and 8

`cfg` trains one rank-8 LoRA per effect on the embedded toy base (flow matching, lr 3e-3, batch 32: the bench's teacher
recipe), in five settings: the prompt dropped with probability p_drop, and a dropped sample learning either the effect
itself ("same", as the bench's teachers) or the unedited source ("source": without its instruction the LoRA does nothing,
so CFG extrapolates from the identity towards the edit), for 600 or 100 (under-trained) steps. Then it measures each
teacher as the bench's rows do (16 held-out sources x 4 seeds): teacher_40_g{1,2,3,5} (Euler, true CFG) and teacher_8 (the
student's 8-step sampler, no CFG). About 32 min on one core.

`mmse` asks why teacher_8 wins: the 8-step sampler ends with an x0 prediction from sigma = 0.3, a posterior mean, and nearest-
valid PSNR (an MSE) favours a mean over a sample. So the 40-step ODE is also run to sigma 0.3 and finished with one x0
prediction (teacher_40_x0@0.3). About 3 min.

`spread` splits the energy score of a `--quick` run's rows (teacher_8, fm_teacher_8, collectionlora_8) into its two terms:
accuracy E|X - Y| and spread E|X - X'| over the seeds (python examples/teacher_samplers.py spread --run <its folder>;
--train: on 16 of the sources the distiller trained on).
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402
import effectbench as eb  # noqa: E402

EFFECTS = ["tint_any", "shift_any", "invert", "edges", "channel_swap_any", "exposure_any"]  # 4 multi-modal, 2 deterministic
SETTINGS = {"bench": (0.15, "same", 600), "no dropout": (0.0, "same", 600), "dropped -> source": (0.15, "source", 600),
            "short": (0.15, "same", 100), "short, dropped -> source": (0.3, "source", 100)}  # name: (p_drop, drop_to, steps)


def train_teacher(pipe, e, k: int, images, src, prompts, empty, p_drop: float, drop_to: str, steps: int, rank: int = 8) -> None:
    """effectbench.fm_train's loop for one LoRA (adapter name = the effect's), with a choice of what a dropped prompt learns."""
    n = len(src)
    targets = torch.stack([eb.pack(pipe, torch.stack([e.fn(x, v) for x in images])) for v in range(e.K)])  # (K, n, L, 16)
    torch.manual_seed(k)
    pipe.transformer.add_adapter(eb.lora_config(rank), adapter_name=e.name)
    pipe.transformer.set_adapter(e.name)
    params = cl.adapter_params(pipe.transformer, e.name)
    g = torch.Generator().manual_seed(k)
    opt = torch.optim.AdamW(params, 3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps, pct_start=0.05)
    for _ in range(steps):
        i = torch.randint(n, (32,), generator=g)
        x0 = targets[torch.randint(len(targets), (32,), generator=g), i]  # a random valid output
        drop = torch.rand(32, generator=g) < p_drop
        x0 = torch.where(drop[:, None, None], src[i], x0) if drop_to == "source" else x0
        p = eb.Prompts(torch.where(drop[:, None, None], empty.embeds[i], prompts.embeds[i]),
                       torch.where(drop[:, None], empty.mask[i], prompts.mask[i]))
        eps, sigma = torch.randn(x0.shape, generator=g), torch.rand(32, generator=g)
        v = eb.predict_v(pipe.transformer, cl.add_noise(x0, eps, sigma[:, None, None]), sigma, src[i], p)
        loss = cl.flow_matching_loss(v, x0, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        schedule.step()
    pipe.transformer.eval()


def report(title: str, r: dict, methods) -> None:
    print(title, flush=True)
    for m in methods:
        cov = [r[e][m]["coverage"] for e in r if r[e][m]["coverage"] is not None]
        print(f"  {m:18s} PSNR {sum(r[e][m]['psnr_valid'] for e in r) / len(r):6.2f}  coverage {sum(cov) / len(cov):.2f}  "
              f"BCR {sum(r[e][m]['bad_case'] for e in r) / len(r):.3f}  energy {sum(r[e][m]['energy'] for e in r) / len(r):.4f} | "
              + " ".join(f"{r[e][m]['psnr_valid']:.1f}/{r[e][m]['energy']:.3f}" for e in r),
              flush=True)


def cfg_probe() -> None:
    registry = eb.effect_registry()
    world = eb.build_world({k: registry[k] for k in EFFECTS}, 0)
    print("per effect: " + " ".join(EFFECTS))
    for name, (p_drop, drop_to, steps) in SETTINGS.items():
        t0 = time.time()
        pipe = eb.load_base(eb.TOY / "base")
        n = len(world.train)
        src, empty = eb.pack(pipe, world.train), eb.encode_prompts(pipe, world.train, [""] * n)
        for k, e in enumerate(world.effects):
            both = eb.concat_prompts(eb.encode_prompts(pipe, world.train, [e.instruction] * n), empty)  # one length
            train_teacher(pipe, e, k, world.train, src, both[:n], both[n:], p_drop, drop_to, steps)
        methods = {f"teacher_40_g{g:g}": eb.Method(lambda e: [e.name], g=g) for g in (1, 2, 3, 5)}
        methods["teacher_8"] = eb.Method(lambda e: [e.name])
        with eb.bench_sizes():
            r = eb.evaluate(world, world.effects, pipe, methods, 4, "teacher_40_g1", quiet=True)["results"]
        report(f"== {name}: p_drop {p_drop}, a dropped prompt learns {drop_to}, {steps} steps ({time.time() - t0:.0f} s)", r, methods)


def mmse_probe() -> None:
    stop, plain = float(cl.student_sigmas(8, 3.0)[-1]), eb.sample_teacher  # 0.3: where the 8-step sampler takes its last x0

    @torch.no_grad()
    def sample_teacher(transformer, noise, source, p, empty, sigmas, g):  # g = 1 + 1e-7 marks the row that ends on x0
        if g == 1 or g > 1.001:
            return plain(transformer, noise, source, p, empty, sigmas, g)
        x = noise
        for i in range(len(sigmas) - 1):
            v = eb.predict_v(transformer, x, sigmas[i].expand(len(x)), source, p)
            if sigmas[i] <= stop + 1e-6:
                return cl.x0_from_v(x, v, sigmas[i])
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        return x
    eb.sample_teacher = sample_teacher
    registry = eb.effect_registry()
    world = eb.build_world({k: registry[k] for k in eb.TOY_EFFECTS}, 0)
    methods = {"teacher_40": eb.Method(lambda e: [e.name], g=1.0), "teacher_40_x0@0.3": eb.Method(lambda e: [e.name], g=1 + 1e-7),
               "teacher_8": eb.Method(lambda e: [e.name])}
    with eb.bench_sizes():
        pipe = eb.load_all(eb.TOY / "base", world.effects, eb.TOY / "teachers", {})
        r = eb.evaluate(world, world.effects, pipe, methods, 4, "teacher_40", quiet=True)["results"]
    report("the embedded toy teachers; per effect: " + " ".join(eb.TOY_EFFECTS), r, methods)


@torch.no_grad()
def spread_probe(run: Path, seeds: int = 4, train: bool = False) -> None:
    """The energy score's two terms for a --quick run's rows: accuracy E|X - Y| and spread E|X - X'| over the seeds; on the
    16 held-out sources, or (train) on the first 16 of the 32 sources the distiller trained on."""
    registry, student = eb.effect_registry(), next(run.glob("distil_*_gw/lora"))
    world = eb.build_world({k: registry[k] for k in eb.QUICK_EFFECTS}, 0)
    prompts = eb.student_prompts(student)
    methods = {"teacher_8": eb.Method(lambda e: [e.name]), "fm_teacher_8": eb.Method(lambda e: ["fm_teacher"], prompts),
               "collectionlora_8": eb.Method(lambda e: ["collectionlora"], prompts)}
    with eb.bench_sizes():
        pipe = eb.load_all(eb.TOY / "base", world.effects, run / "teachers", {"collectionlora": student,
                                                                               "fm_teacher": next(run.glob("fm_teacher_lora_g1_k4"))})
        test = world.train[: len(world.test)] if train else world.test
        n = len(test)
        src, empty = eb.pack(pipe, test), eb.encode_prompts(pipe, test, [""] * n)
        noise = torch.randn((seeds * n, *src.shape[1:]), generator=torch.Generator().manual_seed(1))  # as evaluate()
        rep = lambda t: t.repeat(seeds, *[1] * (t.ndim - 1))
        print(f"{'':18s} " + " ".join(f"{e.name:>22s}" for e in world.effects) + "   (E|X-Y| / E|X-X'|, RMS pixel distance)")
        for m, spec in methods.items():
            cells = []
            for e in world.effects:
                p = eb.encode_prompts(pipe, test, [spec.prompts[e.name] if spec.prompts else e.instruction] * n)
                x, _, _ = eb.run_method(pipe, spec, e, noise, rep(src), eb.Prompts(rep(p.embeds), rep(p.mask)),
                                        eb.Prompts(rep(empty.embeds), rep(empty.mask)), None)
                rt = lambda im: eb.unpack(pipe, eb.pack(pipe, im))
                valid = torch.stack([rt(torch.stack([e.fn(s, v) for s in test])) for v in range(e.K)]).flatten(2)  # (K, n, D)
                out = eb.unpack(pipe, x).reshape(seeds, n, -1)
                rms = lambda a, b: (a[:, None] - b[None]).pow(2).mean(-1).sqrt()
                cells.append(f"{rms(out, valid).mean():.4f} / {rms(out, out).sum((0, 1)).mean() / (seeds * (seeds - 1)):.4f}")
            print(f"{m:18s} " + " ".join(f"{c:>22s}" for c in cells), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["cfg", "mmse", "spread"])
    p.add_argument("--run", default="runs/effectbench/seed0/quick_t600_toy", help="spread: a --quick run's folder")
    p.add_argument("--train", action="store_true", help="spread: on sources the distiller trained on, not held-out ones")
    torch.set_num_threads(1)
    args = p.parse_args()
    {"cfg": cfg_probe, "mmse": mmse_probe, "spread": lambda: spread_probe(Path(args.run), train=args.train)}[args.probe]()
