"""Oracle and behaviour tests for collectionlora.py on a tiny random Qwen-Image-Edit pipeline (CPU).

    pytest -q test_collectionlora.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from peft.utils import set_peft_model_state_dict
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import collectionlora as cl

sys.path.insert(0, str(Path(__file__).parent / "examples"))
from make_tiny_teachers import make_tiny_teachers, random_image, random_lora  # noqa: E402

ROOT = Path(__file__).parent
EFFECTS = [("glow", "Add a warm glow", 4, 2.0), ("sketch", "Turn it into a sketch", 8, 8.0),
           ("neon", "Make the edges neon", 4, 8.0)]


@pytest.fixture(autouse=True)
def tiny_sizes():
    with cl.tiny_image_sizes():
        yield


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_tiny_teachers(root / "teachers", root / "general", n_images=1, effects=EFFECTS)
    return root


def tiny_config(root: Path, out: Path, **kw) -> cl.Config:
    base = dict(teachers=str(root / "teachers"), general=str(root / "general"), base="tiny", out=str(out),
                rank=8, alpha=8.0, lr=1e-3, critic_lr=1e-3, route_every=5, max_steps=10, save_every=5,
                log_every=1000, teacher_steps=8)
    return cl.Config(**{**base, **kw})


def transformer_out(transformer, seed=0):
    """A fixed transformer call: the function every adapter comparison is made on."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 16, generator=g)
    c = cl.EditInputs(torch.randn(1, 7, 16, generator=g), None, torch.randn(1, 16, 16, generator=g),
                      [[(1, 4, 4), (1, 4, 4)]])
    with torch.no_grad():
        return cl.predict_v(transformer, x, torch.tensor(0.7), c)


# ---- flow-matching maths ----

def test_x0_v_round_trip():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 16, generator=g), torch.randn(2, 16, 16, generator=g)
    sigma = torch.tensor(0.37)
    x_t = cl.add_noise(x0, eps, sigma)
    torch.testing.assert_close(cl.x0_from_v(x_t, eps - x0, sigma), x0, rtol=0, atol=1e-6)


def test_cfg_with_g_1_is_the_conditional_prediction():
    cond, uncond = torch.randn(3, 5), torch.randn(3, 5)
    assert torch.equal(cl.classifier_free_guidance(uncond, cond, 1.0), cond)
    torch.testing.assert_close(cl.classifier_free_guidance(uncond, cond, 5.0), cond + 4 * (cond - uncond))


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    g = torch.Generator().manual_seed(1)
    x0_hat = torch.randn(2, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)
    real, fake = torch.randn(2, 16, 16, generator=g, dtype=torch.float64), torch.randn(2, 16, 16, generator=g, dtype=torch.float64)
    cl.dmd_loss(x0_hat, real, fake).backward()
    expected = torch.stack([(fake[i] - real[i]) / (x0_hat[i] - real[i]).abs().mean() for i in range(2)]) / x0_hat.numel()
    torch.testing.assert_close(x0_hat.grad, expected.detach(), rtol=1e-5, atol=1e-9)  # fp32 loss


def test_shift_reproduces_the_official_student_sigmas():
    official = [1000, 954.5455, 900, 833.3333, 750, 642.8571, 500, 300]  # causvid denoising_step_list
    torch.testing.assert_close(cl.student_sigmas(8, 3.0), torch.tensor(official) / 1000, rtol=0, atol=1e-6)


# ---- teacher bank: formats, rank padding, switching ----

def to_kohya(peft_sd: dict, alpha: float) -> dict:
    """A kohya-style copy of a peft LoRA: lora_unet_<module_with_underscores>.lora_down/up + .alpha."""
    out = {}
    for k, v in peft_sd.items():
        module, kind = k.removeprefix("transformer.").rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if kind == 'A.weight' else 'up'}.weight"] = v
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def make_bank(tmp_path, loras):
    """A teachers folder from (name, state_dict-or-None, config) and a bank on a fresh tiny pipeline."""
    pipe = cl.build_tiny_pipeline(0)
    for name, sd, config, kohya in loras:
        folder = tmp_path / "teachers" / name
        folder.mkdir(parents=True)
        if kohya:
            save_file(to_kohya(sd, config.lora_alpha), str(folder / "lora.safetensors"))
        else:
            type(pipe).save_lora_weights(folder, transformer_lora_layers=sd, weight_name="lora.safetensors",
                                         transformer_lora_adapter_metadata=config.to_dict())
        (folder / "effect.json").write_text(json.dumps({"instruction": name}))
    effects = cl.read_teachers(tmp_path / "teachers")
    return pipe, cl.TeacherBank(effects, pipe, tmp_path / "cache")


def test_rank4_teacher_in_rank8_slot_matches_diffusers_loading(tmp_path):
    donor = cl.build_tiny_pipeline(0)
    sd4, c4 = random_lora(donor, 4, 2.0, seed=1)   # alpha != rank: the scale must be carried over
    sd8, c8 = random_lora(donor, 8, 8.0, seed=2)
    pipe, bank = make_bank(tmp_path, [("a", sd4, c4, False), ("b", sd8, c8, False)])
    assert bank.rank == 8
    reference = cl.build_tiny_pipeline(0)
    reference.load_lora_weights(str(tmp_path / "teachers" / "a" / "lora.safetensors"))
    bank.swap(0)
    cl.use_adapter(pipe.transformer, "teacher")
    expected = transformer_out(reference.transformer)
    torch.testing.assert_close(transformer_out(pipe.transformer), expected, rtol=0, atol=1e-5)
    assert (expected - transformer_out(cl.build_tiny_pipeline(0).transformer)).abs().max() > 1e-2  # the LoRA matters
    bank.swap(1)  # and swapping to the other teacher changes the output
    assert (transformer_out(pipe.transformer) - expected).abs().max() > 1e-2


def test_kohya_and_diffusers_files_of_one_lora_give_the_same_teacher(tmp_path):
    sd, config = random_lora(cl.build_tiny_pipeline(0), 4, 8.0, seed=3)
    pipe, bank = make_bank(tmp_path, [("diffusers", sd, config, False), ("kohya", sd, config, True)])
    cl.use_adapter(pipe.transformer, "teacher")
    bank.swap(0)
    out_diffusers = transformer_out(pipe.transformer)
    bank.swap(1)
    torch.testing.assert_close(transformer_out(pipe.transformer), out_diffusers, rtol=0, atol=1e-5)


def test_disabled_teacher_is_exactly_the_base(tmp_path):
    sd, config = random_lora(cl.build_tiny_pipeline(0), 4, 4.0, seed=4)
    pipe, bank = make_bank(tmp_path, [("a", sd, config, False)])
    bank.swap(0)
    cl.use_adapter(pipe.transformer, None)
    assert torch.equal(transformer_out(pipe.transformer), transformer_out(cl.build_tiny_pipeline(0).transformer))


def test_gradients_reach_only_the_adapter_being_trained(teachers, tmp_path):
    cfg = tiny_config(teachers, tmp_path)
    pipe = cl.build_tiny_pipeline(0)
    bank, data, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), [])
    cl.add_trainable_adapters(pipe.transformer, cfg)
    with torch.no_grad():  # LoRA B starts at zero, which would hide gradients to A; make every adapter live
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    b = data.batch(cl.Route("effect", 0, 0), "cpu")
    bank.swap(0)
    sigmas, gen = cl.student_sigmas(8, 3.0), torch.Generator().manual_seed(0)
    for loss_fn, trained in ((lambda: sum(cl.student_loss(pipe.transformer, b, sigmas, cfg, gen).values()), "student"),
                             (lambda: cl.critic_loss(pipe.transformer, b, sigmas, cfg, gen), "critic")):
        pipe.transformer.zero_grad(set_to_none=True)
        loss_fn().backward()
        for name in ("student", "critic", "teacher"):
            grads = {n: p.grad for n, p in pipe.transformer.named_parameters() if f".{name}." in n}
            if name == trained:
                # every LoRA reaches the image output except the last block's text-stream outputs (unused)
                dead = {n for n in grads if n.startswith("transformer_blocks.1.") and
                        any(s in n for s in ("add_q_proj", "to_add_out", "txt_mlp"))}
                assert {n for n, gr in grads.items() if gr is None} <= dead
                assert [n for n in grads if n not in dead and grads[n].abs().sum() == 0] == []
            else:
                assert all(gr is None for gr in grads.values()), f"{name} got gradients from the {trained} loss"
        assert all(p.grad is None for n, p in pipe.transformer.named_parameters() if "lora" not in n)


# ---- router and prompts ----

def test_router_frequency_and_reproducibility():
    router = cl.Router(5, [3] * 5, 7, p_switch=0.3, route_every=1, seed=0)
    routes = [router.route(s) for s in range(20000)]
    share = sum(r.stream == "effect" for r in routes) / len(routes)
    assert abs(share - 0.3) < 0.015
    assert {r.effect for r in routes if r.stream == "effect"} == set(range(5))
    assert routes[:500] == [cl.Router(5, [3] * 5, 7, 0.3, 1, seed=0).route(s) for s in range(500)]
    assert routes[:500] != [cl.Router(5, [3] * 5, 7, 0.3, 1, seed=1).route(s) for s in range(500)]
    periodic = cl.Router(5, [3] * 5, 7, p_switch=0.5, route_every=20, seed=0)
    for start in range(0, 200, 20):  # stream and effect are constant within a period
        assert len({(periodic.route(s).stream, periodic.route(s).effect) for s in range(start, start + 20)}) == 1


def test_chosen_triggers_are_more_orthogonal_than_naive_ones():
    pipe = cl.build_tiny_pipeline(0)
    effects = [cl.Effect(f"fx{i}", "Apply the effect to the image", Path("x"), []) for i in range(6)]
    report = cl.choose_triggers(pipe, effects, seed=0)
    assert report["chosen_max_cos"] < report["naive_max_cos"] - 0.01
    empty = cl.prompt_embedding(pipe, "")
    embs = torch.stack([cl.prompt_embedding(pipe, e.student_prompt) - empty for e in effects])
    assert cl.max_pairwise_cosine(embs) == pytest.approx(report["chosen_max_cos"], abs=1e-6)
    assert len({e.trigger for e in effects}) == 6 and all(e.student_prompt.startswith(e.trigger) for e in effects)


def test_duplicate_triggers_are_an_error():
    effects = [cl.Effect(n, "x", Path("x"), [], trigger="<same>") for n in ("a", "b")]
    with pytest.raises(cl.InputError, match="share the trigger"):
        cl.choose_triggers(cl.build_tiny_pipeline(0), effects, seed=0)


# ---- end to end: distillation, export, resume ----

@pytest.fixture(scope="module")
def trained(teachers, tmp_path_factory):
    with cl.tiny_image_sizes():
        out = tmp_path_factory.mktemp("run")
        lora = cl.train(tiny_config(teachers, out, max_steps=100, gen_every=1, lr=3e-3, critic_lr=3e-3, p_switch=0.8))
    return out, lora


def test_distillation_moves_the_student_towards_every_teacher(trained):
    meta = json.loads((trained[1] / "collectionlora.json").read_text())
    before, after = meta["distance_to_teacher"]["before"], meta["distance_to_teacher"]["after"]
    assert len(before) == 3
    for b0, b1 in zip(before, after):
        assert b1 < 0.85 * b0, (before, after)


def test_teacher_targets_and_encodings_are_cached(teachers, trained, monkeypatch):
    cfg = tiny_config(teachers, trained[0])
    pipe = cl.build_tiny_pipeline(0)
    effects = cl.read_teachers(cfg.teachers)
    bank = cl.TeacherBank(effects, pipe, cfg.cache)
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("teacher re-run despite the cache"))
    y = cl.teacher_target(pipe, bank, 0, effects[0].images[0], cfg, pipe.scheduler)
    assert y.shape == (1, 16, 16) and torch.isfinite(y).all()
    fresh = cl.encode(pipe, Image.open(effects[0].images[0]).convert("RGB"), effects[0].instruction)
    monkeypatch.setattr(type(pipe), "encode_prompt", lambda *a, **k: pytest.fail("text encoder re-run despite the cache"))
    cached = cl.cached_encode(pipe, effects[0].images[0], effects[0].instruction, cfg)
    assert torch.equal(cached.embeds, fresh.embeds) and torch.equal(cached.image_latents, fresh.image_latents)


def test_exported_lora_reproduces_the_student_in_a_stock_pipeline(teachers, trained):
    out, lora = trained
    meta = json.loads((lora / "collectionlora.json").read_text())
    image = Image.open(next((teachers / "teachers").glob("*/images/*.png"))).convert("RGB")
    prompt = meta["effects"][0]["student_prompt"]
    # the in-memory student: the trained weights from the last checkpoint, on a pipeline with all adapters
    cfg = tiny_config(teachers, out)
    live = cl.build_tiny_pipeline(0)
    live.set_progress_bar_config(disable=True)
    cl.add_trainable_adapters(live.transformer, cfg)
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    set_peft_model_state_dict(live.transformer, state["student"], adapter_name="student")
    cl.use_adapter(live.transformer, "student")
    live.scheduler = cl.student_scheduler(cfg)
    stock = cl.build_tiny_pipeline(0)
    stock.set_progress_bar_config(disable=True)
    cl.load_student(stock, lora)
    a = cl.sample(live, image, prompt, seed=3, output_type="pt")
    b = cl.sample(stock, image, prompt, seed=3, output_type="pt")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    base = cl.build_tiny_pipeline(0)
    base.scheduler = cl.student_scheduler(cfg)
    base.set_progress_bar_config(disable=True)
    assert (cl.sample(base, image, prompt, seed=3, output_type="pt") - a).abs().max() > 1e-3  # the LoRA matters


def test_stock_scheduler_visits_exactly_the_trained_sigmas(trained):
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = cl.build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(trained[1]), subfolder="scheduler")
    seen = []

    def spy(p, i, t, kwargs):
        seen.append(p.scheduler.sigmas[i].item())
        return kwargs
    pipe(image=random_image(torch.Generator().manual_seed(0)), prompt="x", true_cfg_scale=1.0, height=64, width=64,
         num_inference_steps=8, callback_on_step_end=spy, output_type="latent")
    torch.testing.assert_close(torch.tensor(seen), cl.student_sigmas(8, 3.0), rtol=0, atol=1e-6)
    assert pipe.scheduler.sigmas[-1].item() == 0.0 and pipe.scheduler.config.stochastic_sampling


def test_resume_is_bit_identical(teachers, tmp_path):
    straight = load_file(str(cl.train(tiny_config(teachers, tmp_path / "a")) / "pytorch_lora_weights.safetensors"))
    cl.train(tiny_config(teachers, tmp_path / "b", max_steps=5))
    resumed = load_file(str(cl.train(tiny_config(teachers, tmp_path / "b", resume=True)) / "pytorch_lora_weights.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(straight[k].abs().sum() > 0 for k in straight if "lora_B" in k)  # it trained at all


# ---- CLI ----

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "collectionlora.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_cli_help_lists_every_config_knob():
    r = run_cli("--help")
    assert r.returncode == 0
    for f in cl.dataclasses.fields(cl.Config):
        assert f"--{f.name}" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--teachers", "does/not/exist"], "--teachers 'does/not/exist' is not a folder"),
    (["--teachers", "examples/tiny_teachers/warm_glow"], "looks like ONE effect -- pass its parent folder"),
    (["--teachers", "examples/tiny_teachers", "--p_switch", "1.5"], "--p_switch 1.5 is invalid"),
    (["--teachers", "examples/tiny_teachers", "--max_steps", "0"], "--max_steps 0 is invalid"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    r = run_cli(*args, "--base", "tiny", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
