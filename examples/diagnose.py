"""Inside a distillation: at every checkpoint of a run, per effect, the student's gradient per loss term (its size, its
consistency over batches, and whether it points where TA-FM's regression onto the teacher outputs points), and how far the
critic's x0 (fake score) and the student's own samples are from the teacher's x0 (real score).

    python examples/diagnose.py runs/curves/s5_x4                # a run of examples/distil_curve.py (or any --out)
    python examples/diagnose.py runs/curves/s5_x4 tint_any 8     # one effect only, 8 batches per checkpoint

One JSON line per (checkpoint, effect), over `batches` batches (default 24) of 8 of its sources (each batch the next 8):
- gradnorm_{dmd,ts,fm}: root mean square over the batches of the L2 norm of d term / d student LoRA;
- mean_{dmd,ts,fm}: L2 norm of the term's gradient averaged over the batches (pure noise: about gradnorm / sqrt(batches));
- cos_fm_{dmd,ts}: cosine between that averaged gradient and TA-FM's: > 0, the term also pulls the student towards the
  teacher outputs; < 0, it pulls against the regression (examples/LAB_NOTES.md);
- fake_vs_real: MSE between the critic's and the teacher's x0 on noised student samples (t ~ U[0, 1000) shifted);
- x0_vs_real: MSE between those student samples and the teacher's x0;
- for effects of the toy world (examples/effectbench.py), against the truth z (the VAE latents of the valid output nearest
  the student's sample), at each of SIGMAS: truth_{x0,real,fake,y}, the MSE to z of the student's x0, of the teacher's
  and the critic's x0 on it noised to sigma, and of the teacher output y; cos_truth_{dmd,y}, the cosine between DMD's step
  on the sample (real - fake) and the way to the truth (z - x0), and that of the teacher output (y - x0): > 0 helps;
  sample_error [train, held out], the MSE to z of the student's 8-step samples (fixed noise) on 16 of the effect's
  training sources and on the bench's 16 held-out sources; step_{dmd,ts,fm,total}_{raw,adam}: per size in STEPS, its
  relative change [train, held out] after one descent step along that term's mean gradient alone (total: the weighted
  sum training follows; raw: the gradient's direction; adam: each weight's mean over its rms, as Adam with beta1 0
  moves): < 0, the step helps the samples themselves.
The warm start's checkpoints are skipped (no critic yet); its last (step == --warmup) is measured as the full objective
begins: critic = student.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
import collectionlora as cl  # noqa: E402
import effectbench as eb  # noqa: E402


STEPS = (1e-5, 3e-5)  # the step test: rms change per student LoRA weight (Adam: up to ~lr = 1e-4 per update)
SIGMAS = (0.4, 0.75, 0.95)  # the truth measures: DMD's step at these noise levels (its sigma is ~ U[0, 1) shifted by 3)


def scores(tr, x_t, sigma, b, cfg) -> tuple:
    """(real, fake): the teacher's x0 on x_t (with CFG, as training's real score) and the critic's."""
    cl.use_adapter(tr, "teacher")
    v_real = cl.predict_v(tr, x_t, sigma, b.teacher)
    if cfg.guidance != 1:
        v_real = cl.classifier_free_guidance(cl.predict_v(tr, x_t, sigma, b.negative), v_real, cfg.guidance)
    cl.use_adapter(tr, "critic")
    return cl.x0_from_v(x_t, v_real, sigma), cl.x0_from_v(x_t, cl.predict_v(tr, x_t, sigma, b.student), sigma)


def main(out: Path, only: str = "", batches: int = 24):
    torch.set_num_threads(1)
    meta = json.loads((out / "lora" / "collectionlora.json").read_text())
    cfg = cl.Config(**meta["config"] | {"target_modules": tuple(meta["config"]["target_modules"]), "resume": False})
    pipe = cl.load_pipeline(cfg.base, torch.device("cpu"), torch.float32, cfg.seed)
    effects = cl.read_teachers(cfg.teachers)
    for e in effects:  # the run's own student prompts
        e.trigger = next(d["trigger"] for d in meta["effects"] if d["name"] == e.name)
    with cl.image_sizes(cfg):
        bank, data, _ = cl.prepare(pipe, cfg, effects, [])
    tr, sigmas = pipe.transformer, cl.student_sigmas(cfg.student_steps, cfg.shift)
    cl.add_trainable_adapters(tr, cfg)
    params = cl.adapter_params(tr, "student")
    registry = eb.effect_registry()

    held_out = eb.make_sources(256, 16, 0)[1]  # the bench's 16 held-out sources (seed 0), never trained on

    def nearest(valid, x):  # valid (B, K, L, C): per sample of x, the nearest valid output
        return valid[torch.arange(len(x)), (valid - x[:, None]).pow(2).flatten(2).mean(2).argmin(1)]

    def valid_latents(i: int, sources):  # the K valid outputs of effect i on each source, encoded as the pipeline does
        spec = registry[effects[i].name]
        with torch.no_grad():
            return torch.stack([eb.pack(pipe, torch.stack([spec[1](s, v) for s in sources])) for v in range(spec[2])], 1)

    def nearest_truth(i: int, route, x):
        pool = data.pools[i]
        return nearest(valid_latents(i, torch.stack([eb.from_pil(Image.open(pool[s % len(pool)])) for s in route.sources])), x)

    def error_sets(i: int) -> list:
        """(inputs, truth function) for 16 of the effect's training sources and for the 16 held-out ones."""
        route = cl.Route("effect", i, tuple(range(16)))  # the first 16 sources, their first targets' order
        with cl.image_sizes(cfg):
            held = cl.stack([cl.encode(pipe, eb.to_pil(x), effects[i].student_prompt) for x in held_out], "cpu")
        valid = valid_latents(i, held_out)
        return [(data.batch(route, "cpu").student, lambda x: nearest_truth(i, route, x)), (held, lambda x: nearest(valid, x))]

    def sample_error(sets: list) -> list:
        """Per set: latent MSE to the truth of the student's 8-step samples (fixed noise)."""
        cl.use_adapter(tr, "student")
        errors = []
        for inputs, truth in sets:
            with torch.no_grad():
                x = cl.backward_simulation(tr, inputs, sigmas, len(sigmas), torch.Generator().manual_seed(7))
            errors.append(float((x - truth(x)).pow(2).mean()))
        return errors

    flat = lambda grads: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    for ckpt in sorted((out / "checkpoints").glob("step_*.pt")):
        state = torch.load(ckpt, weights_only=True)
        if state["step"] < cfg.warmup:  # a warm start's checkpoint: no critic yet, DMD would compare with the bare base
            continue
        for name in ("student", "critic"):
            set_peft_model_state_dict(tr, state[name], adapter_name=name)
        if state["step"] == cfg.warmup > 0:  # as train_step does when the full objective begins
            set_peft_model_state_dict(tr, get_peft_model_state_dict(tr, adapter_name="student"), adapter_name="critic")
        for i in [[e.name for e in effects].index(only)] if only else range(len(effects)):
            total, square, second, fake_vs_real, x0_vs_real, truth, cos = {}, {}, {}, [], [], {}, {}
            spec = registry.get(effects[i].name)
            bank.swap(i)
            n = len(data.pools[i]) * cfg.targets_per_image  # the router's pool: every (source, target)
            for r in range(batches):
                route = cl.Route("effect", i, tuple((8 * r + k) % n for k in range(8)))
                b = data.batch(route, "cpu")
                gen = torch.Generator().manual_seed(100 + r)
                for term, loss in cl.student_loss(tr, b, sigmas, cfg, gen).items():
                    g = flat(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
                    total[term], square[term] = total.get(term, 0) + g, square.get(term, 0.0) + float(g.pow(2).sum())
                    second[term] = second.get(term, 0) + g.pow(2)
                with torch.no_grad():
                    x0 = cl.on_policy_x0(tr, b.student, sigmas, gen)
                    _, sigma = cl.draw_sigma(gen, 0.0, cfg.shift)
                    x_t = cl.add_noise(x0, torch.randn(x0.shape, generator=gen), sigma)
                    real, fake = scores(tr, x_t, sigma, b, cfg)
                fake_vs_real.append(float((fake - real).pow(2).mean()))
                x0_vs_real.append(float((x0 - real).pow(2).mean()))
                if spec:
                    z = nearest_truth(i, route, x0)
                    with torch.no_grad():
                        eps = torch.randn(x0.shape, generator=gen)
                        for band, sigma in enumerate(torch.tensor(SIGMAS)):  # DMD's step on x0 at a few noise levels
                            real, fake = scores(tr, cl.add_noise(x0, eps, sigma), sigma, b, cfg)
                            for name, x in (("x0", x0), ("real", real), ("fake", fake), ("y", b.target)):
                                truth.setdefault(name, [0.0] * len(SIGMAS))[band] += float((x - z).pow(2).mean()) / batches
                            for name, step in (("dmd", real - fake), ("y", b.target - x0)):
                                c = F.cosine_similarity(step.flatten(1), (z - x0).flatten(1), 1).mean()
                                cos.setdefault(name, [0.0] * len(SIGMAS))[band] += float(c) / batches
            mean = {t: g / batches for t, g in total.items()}
            mean["total"] = mean["dmd"] + cfg.w_ts * mean["ts"] + cfg.w_fm * mean["fm"]  # what the full objective follows
            if spec:  # a small step along each term's mean gradient alone: does the 8-step samples' error to the truth fall?
                sets, start, step_test = error_sets(i), [p.detach().clone() for p in params], {}
                before = sample_error(sets)
                for term, g in mean.items():  # raw: the mean gradient; adam: per weight, mean / rms (total: cross terms left out)
                    rms = (second["dmd"] + cfg.w_ts * cfg.w_ts * second["ts"] + cfg.w_fm ** 2 * second["fm"] if term == "total"
                           else second[term]).div(batches).sqrt() + 1e-12
                    for kind, d in (("raw", g / g.pow(2).mean().sqrt()), ("adam", (g / rms) / (g / rms).pow(2).mean().sqrt())):
                        for size in STEPS:
                            with torch.no_grad():
                                for p, p0, dp in zip(params, start, d.split([p.numel() for p in params])):
                                    p.copy_(p0 - size * dp.view_as(p))  # descent; the rms change per LoRA weight is `size`
                            after = sample_error(sets)
                            step_test.setdefault(f"{term}_{kind}", []).append([round(a / b - 1, 4) for a, b in zip(after, before)])
                with torch.no_grad():
                    for p, p0 in zip(params, start):
                        p.copy_(p0)
            print(json.dumps({"step": state["step"], "effect": effects[i].name}
                             | {f"gradnorm_{t}": round((s / batches) ** 0.5, 4) for t, s in square.items()}
                             | {f"mean_{t}": round(float(g.norm()), 4) for t, g in mean.items()}
                             | {f"cos_fm_{t}": round(float(F.cosine_similarity(mean[t], mean["fm"], 0)), 3) for t in ("dmd", "ts")}
                             | {"fake_vs_real": round(sum(fake_vs_real) / batches, 4), "x0_vs_real": round(sum(x0_vs_real) / batches, 4)}
                             | {f"truth_{k}": [round(v, 4) for v in vs] for k, vs in truth.items()}
                             | {f"cos_truth_{k}": [round(v, 3) for v in vs] for k, vs in cos.items()}
                             | ({"sample_error": [round(b, 4) for b in before]} | {f"step_{k}": v for k, v in step_test.items()}
                                if spec else {})),
                  flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3], *map(int, sys.argv[3:4]))
