"""Inside a distillation: at every checkpoint of a run, per effect, the student's gradient per loss term (its size, its
consistency over batches, and whether it points where TA-FM's regression onto the teacher outputs points), and how far the
critic's x0 (fake score) and the student's own samples are from the teacher's x0 (real score).

    python examples/diagnose.py runs/curves/s5_x4                # a run of examples/distil_curve.py (or any --out)
    python examples/diagnose.py runs/curves/s5_x4 tint_any 8     # one effect only, 8 batches per checkpoint

One JSON line per (checkpoint, effect), over `batches` batches (default 24) of 8 of its sources (each batch the next 8):
- gradnorm_{dmd,ts,fm}: root mean square over the batches of the L2 norm of d term / d student LoRA;
- mean_{dmd,ts,fm}: L2 norm of the term's gradient averaged over the batches (pure noise: about gradnorm / sqrt(batches));
- cos_fm_{dmd,ts}: cosine between that averaged gradient and TA-FM's: > 0, the term also pulls the student towards the
  teacher outputs; < 0, it pulls against the regression (the README's convergence notes);
- fake_vs_real: MSE between the critic's and the teacher's x0 on noised student samples (t ~ U[0, 1000) shifted);
- x0_vs_real: MSE between those student samples and the teacher's x0.
The warm start's checkpoints are skipped (no critic yet); its last (step == --warmup) is measured as the full objective
begins: critic = student.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft.utils import set_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402


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
    flat = lambda grads: torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])
    for ckpt in sorted((out / "checkpoints").glob("step_*.pt")):
        state = torch.load(ckpt, weights_only=True)
        if state["step"] < cfg.warmup:  # a warm start's checkpoint: no critic yet, DMD would compare with the bare base
            continue
        for name in ("student", "critic"):
            set_peft_model_state_dict(tr, state[name], adapter_name=name)
        if state["step"] == cfg.warmup > 0:  # as train_step does when the full objective begins
            cl.copy_adapter(tr, "student", "critic")
        for i in [[e.name for e in effects].index(only)] if only else range(len(effects)):
            total, square, fake_vs_real, x0_vs_real = {}, {}, [], []
            bank.swap(i)
            n = len(data.pools[i]) * cfg.targets_per_image  # the router's pool: every (source, target)
            for r in range(batches):
                b = data.batch(cl.Route("effect", i, tuple((8 * r + k) % n for k in range(8))), "cpu")
                gen = torch.Generator().manual_seed(100 + r)
                for term, loss in cl.student_loss(tr, b, sigmas, cfg, gen).items():
                    g = flat(torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))
                    total[term], square[term] = total.get(term, 0) + g, square.get(term, 0.0) + float(g.pow(2).sum())
                with torch.no_grad():
                    x0 = cl.on_policy_x0(tr, b.student, sigmas, gen)
                    _, sigma = cl.draw_sigma(gen, 0.0, cfg.shift)
                    x_t = cl.add_noise(x0, torch.randn(x0.shape, generator=gen), sigma)
                    cl.use_adapter(tr, "teacher")
                    v_real = cl.predict_v(tr, x_t, sigma, b.teacher)
                    if cfg.guidance != 1:
                        v_real = cl.classifier_free_guidance(cl.predict_v(tr, x_t, sigma, b.negative), v_real, cfg.guidance)
                    real = cl.x0_from_v(x_t, v_real, sigma)
                    cl.use_adapter(tr, "critic")
                    fake = cl.x0_from_v(x_t, cl.predict_v(tr, x_t, sigma, b.student), sigma)
                fake_vs_real.append(float((fake - real).pow(2).mean()))
                x0_vs_real.append(float((x0 - real).pow(2).mean()))
            mean = {t: g / batches for t, g in total.items()}
            print(json.dumps({"step": state["step"], "effect": effects[i].name}
                             | {f"gradnorm_{t}": round((s / batches) ** 0.5, 4) for t, s in square.items()}
                             | {f"mean_{t}": round(float(g.norm()), 4) for t, g in mean.items()}
                             | {f"cos_fm_{t}": round(float(F.cosine_similarity(mean[t], mean["fm"], 0)), 3) for t in ("dmd", "ts")}
                             | {"fake_vs_real": round(sum(fake_vs_real) / batches, 4), "x0_vs_real": round(sum(x0_vs_real) / batches, 4)}),
                  flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3], *map(int, sys.argv[3:4]))
