"""Inside a distillation: at every checkpoint of a run, the student's gradient norm per loss term and how far the
critic's x0 (fake score) and the student's own samples are from the teacher's x0 (real score).

    python examples/diagnose.py runs/curves/e1_critic_fix        # a run of examples/distil_curve.py (or any --out)
    python examples/diagnose.py runs/curves/s5_long tint_any 4   # one effect only, 4 batches per checkpoint

One JSON line per checkpoint: gradnorm_{dmd,ts,fm} (L2 norm of d term / d student LoRA, mean over 6 effect batches of
8, cycling through the effects, or of `batches` batches of one named effect), fake_vs_real (MSE between the critic's and the teacher's x0 on noised student samples, t ~ U[0, 1000) shifted) and
x0_vs_real (MSE between those student samples and the teacher's x0). The README's convergence notes quote them.
"""
import json
import sys
from pathlib import Path

import torch
from peft.utils import set_peft_model_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402


def main(out: Path, only: str = "", batches: int = 6):
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
    mean = lambda values: round(sum(values) / len(values), 4)
    for ckpt in sorted((out / "checkpoints").glob("step_*.pt")):
        state = torch.load(ckpt, weights_only=True)
        for name in ("student", "critic"):
            set_peft_model_state_dict(tr, state[name], adapter_name=name)
        norms, fake_vs_real, x0_vs_real = {"dmd": [], "ts": [], "fm": []}, [], []
        for r in range(batches):
            i = [e.name for e in effects].index(only) if only else r % len(effects)
            bank.swap(i)
            b = data.batch(cl.Route("effect", i, tuple(range(min(8, len(data.pools[i]))))), "cpu")
            gen = torch.Generator().manual_seed(100 + r)
            for term, loss in cl.student_loss(tr, b, sigmas, cfg, gen).items():
                grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
                norms[term].append(float(sum((g.float() ** 2).sum() for g in grads if g is not None) ** 0.5))
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
        print(json.dumps({"step": state["step"], **{f"gradnorm_{k}": mean(v) for k, v in norms.items() if v},
                          "fake_vs_real": mean(fake_vs_real), "x0_vs_real": mean(x0_vs_real)}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), *sys.argv[2:3], *map(int, sys.argv[3:4]))
