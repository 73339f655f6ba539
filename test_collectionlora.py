"""Oracle and behaviour tests for collectionlora.py on a tiny random Qwen-Image-Edit pipeline (CPU).

    pytest -q test_collectionlora.py
"""
import collections
import contextlib
import dataclasses
import itertools
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

# one thread per process, children included: the tiny model's ops are too small to share, and the tests run several
# processes side by side on a 2-core machine, where threads of different processes wait on each other
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pytest
from peft.utils import set_peft_model_state_dict
import torch
from PIL import Image
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import collectionlora as cl

sys.path.insert(0, str(Path(__file__).parent / "examples"))
from make_tiny_teachers import build_tiny_pipeline, make_tiny_teachers, random_image, random_lora  # noqa: E402

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


def load_student(pipe, lora_dir) -> None:
    """An exported student in a stock pipeline, as the README says: the LoRA, then its 8-step scheduler."""
    pipe.load_lora_weights(str(lora_dir))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(lora_dir), subfolder="scheduler")


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
    pipe = build_tiny_pipeline(0)
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
    donor = build_tiny_pipeline(0)
    sd4, c4 = random_lora(donor, 4, 2.0, seed=1)   # alpha != rank: the scale must be carried over
    sd8, c8 = random_lora(donor, 8, 8.0, seed=2)
    pipe, bank = make_bank(tmp_path, [("a", sd4, c4, False), ("b", sd8, c8, False)])
    assert bank.rank == 8
    reference = build_tiny_pipeline(0)
    reference.load_lora_weights(str(tmp_path / "teachers" / "a" / "lora.safetensors"))
    bank.swap(0)
    cl.use_adapter(pipe.transformer, "teacher")
    expected = transformer_out(reference.transformer)
    torch.testing.assert_close(transformer_out(pipe.transformer), expected, rtol=0, atol=1e-5)
    assert (expected - transformer_out(build_tiny_pipeline(0).transformer)).abs().max() > 1e-2  # the LoRA matters
    bank.swap(1)  # and swapping to the other teacher changes the output
    assert (transformer_out(pipe.transformer) - expected).abs().max() > 1e-2


def test_kohya_and_diffusers_files_of_one_lora_give_the_same_teacher(tmp_path):
    sd, config = random_lora(build_tiny_pipeline(0), 4, 8.0, seed=3)
    pipe, bank = make_bank(tmp_path, [("diffusers", sd, config, False), ("kohya", sd, config, True)])
    cl.use_adapter(pipe.transformer, "teacher")
    bank.swap(0)
    out_diffusers = transformer_out(pipe.transformer)
    bank.swap(1)
    torch.testing.assert_close(transformer_out(pipe.transformer), out_diffusers, rtol=0, atol=1e-5)


def test_disabled_teacher_is_exactly_the_base(tmp_path):
    sd, config = random_lora(build_tiny_pipeline(0), 4, 4.0, seed=4)
    pipe, bank = make_bank(tmp_path, [("a", sd, config, False)])
    bank.swap(0)
    cl.use_adapter(pipe.transformer, None)
    assert torch.equal(transformer_out(pipe.transformer), transformer_out(build_tiny_pipeline(0).transformer))


def test_use_adapter_skips_only_switches_that_change_nothing(teachers, tmp_path):
    """An oracle: after every switch of a random sequence, the base computes what it computes after diffusers' own full calls
    (enable_adapters + set_adapter, or disable_adapters), with the same requires_grad on every LoRA weight."""
    cfg = tiny_config(teachers, tmp_path)
    pipes = [build_tiny_pipeline(0), build_tiny_pipeline(0)]
    for pipe in pipes:
        bank, _, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), [])
        bank.swap(1)
        cl.add_trainable_adapters(pipe.transformer, cfg)
        with torch.no_grad():
            for n, p in pipe.transformer.named_parameters():
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n))) if "lora_B" in n else None
    ours, stock = (p.transformer for p in pipes)
    rng = random.Random(0)
    for name in [rng.choice(["student", "critic", "teacher", None]) for _ in range(40)]:  # repeats included
        cl.use_adapter(ours, name)
        stock.disable_adapters() if name is None else (stock.enable_adapters(), stock.set_adapter(name))
        assert torch.equal(transformer_out(ours), transformer_out(stock)), name
        assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in stock.parameters()], name
    assert outputs_differ(ours)  # the four routes are four different functions: the comparison above could fail


def outputs_differ(transformer) -> bool:
    outs = []
    for name in ("student", "critic", "teacher", None):
        cl.use_adapter(transformer, name)
        outs.append(transformer_out(transformer))
    return all(not torch.equal(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])


def test_gradients_reach_only_the_adapter_being_trained(teachers, tmp_path):
    cfg = tiny_config(teachers, tmp_path)
    pipe = build_tiny_pipeline(0)
    bank, data, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), [])
    cl.add_trainable_adapters(pipe.transformer, cfg)
    with torch.no_grad():  # LoRA B starts at zero, which would hide gradients to A; make every adapter live
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    b = data.batch(cl.Route("effect", 0, (0,)), "cpu")
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


def test_the_critic_learns_the_samples_the_dmd_term_is_applied_to(teachers, tmp_path, monkeypatch):
    """DMD2 and the official critic_loss: the fake score is trained on the student's x0 predicted from a uniformly drawn
    step of its own trajectory, the samples the DMD term is applied to (not only on final 8-step samples).
    Oracle 1: the sigma of the student's last call before each critic call covers all 8 student sigmas.
    Oracle 2: from one RNG state, the critic's training sample is exactly the DMD term's x0_hat."""
    cfg = tiny_config(teachers, tmp_path)
    pipe = build_tiny_pipeline(0)
    bank, data, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), [])
    cl.add_trainable_adapters(pipe.transformer, cfg)
    b = data.batch(cl.Route("effect", 0, (0,)), "cpu")
    bank.swap(0)
    sigmas = cl.student_sigmas(8, 3.0)
    calls, active, use_adapter, predict_v = [], [None], cl.use_adapter, cl.predict_v

    def recording_use_adapter(transformer, name):
        active[0] = name
        use_adapter(transformer, name)

    def recording_predict_v(transformer, x_t, sigma, c):
        calls.append((active[0], float(sigma)))
        return predict_v(transformer, x_t, sigma, c)
    monkeypatch.setattr(cl, "use_adapter", recording_use_adapter)
    monkeypatch.setattr(cl, "predict_v", recording_predict_v)
    gen, last_student_sigma = torch.Generator().manual_seed(0), set()
    for _ in range(80):
        calls.clear()
        cl.critic_loss(pipe.transformer, b, sigmas, cfg, gen)
        first_critic = [who for who, _ in calls].index("critic")
        last_student_sigma.add(round([s for who, s in calls[:first_critic] if who == "student"][-1], 5))
    assert last_student_sigma == {round(s, 5) for s in sigmas.tolist()}

    seen, flow_matching_loss, dmd_loss = {}, cl.flow_matching_loss, cl.dmd_loss

    def first_flow_matching_sample(v, x0, eps):  # the critic's (student_loss's TA-FM comes later)
        seen.setdefault("critic", x0.clone())
        return flow_matching_loss(v, x0, eps)

    def first_dmd_sample(x0_hat, real_x0, fake_x0):  # backward simulation's (target simulation comes later)
        seen.setdefault("dmd", x0_hat.detach().clone())
        return dmd_loss(x0_hat, real_x0, fake_x0)
    monkeypatch.setattr(cl, "flow_matching_loss", first_flow_matching_sample)
    monkeypatch.setattr(cl, "dmd_loss", first_dmd_sample)
    cl.critic_loss(pipe.transformer, b, sigmas, cfg, torch.Generator().manual_seed(5))
    cl.student_loss(pipe.transformer, b, sigmas, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(seen["critic"], seen["dmd"])


def test_a_warm_start_is_ta_fm_alone_then_the_critic_starts_as_the_student(teachers, tmp_path, monkeypatch):
    cfg = tiny_config(teachers, tmp_path, warmup=3, gen_every=2)
    pipe = build_tiny_pipeline(0)
    bank, data, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), cl.read_inputs(cfg)[1])
    tr = pipe.transformer
    cl.add_trainable_adapters(tr, cfg)
    opts = [torch.optim.AdamW(cl.adapter_params(tr, name), 1e-2) for name in ("student", "critic")]
    effect, general = data.batch(cl.Route("effect", 0, (0,)), "cpu"), data.batch(cl.Route("general", -1, (0,)), "cpu")
    bank.swap(0)
    sigmas, gen = cl.student_sigmas(8, 3.0), torch.Generator().manual_seed(0)
    params = lambda name: [p.detach().clone() for p in cl.adapter_params(tr, name)]
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    calls, dmd_term, critic_loss = [], cl.dmd_term, cl.critic_loss
    gap = lambda: max((c - s).abs().max().item() for c, s in zip(params("critic"), params("student")))
    monkeypatch.setattr(cl, "dmd_term", lambda *a: calls.append("dmd") or dmd_term(*a))
    monkeypatch.setattr(cl, "critic_loss", lambda *a: calls.append(("critic", gap())) or critic_loss(*a))
    critic0, student = params("critic"), params("student")
    for step in range(3):  # every warm-up step trains the student (gen_every 2 notwithstanding), by TA-FM alone
        assert set(cl.train_step(step, tr, effect, sigmas, *opts, cfg, gen, contextlib.nullcontext())) == {"fm", "skipped"}
        assert not same(params("student"), student)
        student = params("student")
    assert set(cl.train_step(2, tr, general, sigmas, *opts, cfg, gen, contextlib.nullcontext())) == {"fm", "skipped"}
    assert not same(params("student"), student)  # the general stream learns the base's own output, by TA-FM too
    assert calls == [] and same(params("critic"), critic0) and gap() > 0
    # step 3 ends the warm start: the critic is copied from the student, then trained (3 is not a student step)
    assert set(cl.train_step(3, tr, effect, sigmas, *opts, cfg, gen, contextlib.nullcontext())) == {"critic", "skipped"}
    assert calls == [("critic", 0.0)]
    cl.train_step(4, tr, effect, sigmas, *opts, cfg, gen, contextlib.nullcontext())  # the full objective from now on
    assert calls[1:3] == ["dmd", "dmd"] and calls[3][0] == "critic"
    assert all(p.grad is None for p in tr.parameters())  # every update frees its gradients at once (README "Memory plan")



def test_with_a_warm_start_the_general_stream_learns_the_bare_bases_own_edits(teachers, tmp_path, monkeypatch):
    """A warm start without the general stream unlearnt the base's edits (LAB_NOTES: general edits 32.4 -> 15.0 dB). Its targets are
    the stock pipeline's output with no LoRA at all, one per general picture, its instruction; without a warm start, none."""
    calls, sample = [], cl.sample
    monkeypatch.setattr(cl, "sample", lambda *a: calls.append(a) or sample(*a))
    cfg = tiny_config(teachers, tmp_path, warmup=3)
    general = cl.read_inputs(cfg)[1]
    with cl.image_sizes(cfg):
        data = cl.prepare(build_tiny_pipeline(0), cfg, cl.read_teachers(cfg.teachers), general)[1]
        plain = build_tiny_pipeline(0)  # no adapter of any kind, the base's own scheduler
        plain.set_progress_bar_config(disable=True)
        mine = calls[-len(general):]  # the general targets come last
        assert len(general) > 1 and len(data.general_targets) == len(general)
        for (image, text), y, args in zip(general, data.general_targets, mine, strict=True):
            assert args[2] == text and torch.equal(y, sample(plain, *args[1:]).float().cpu())
        assert len({s for args in mine for s in args[4]}) == len(general)  # each its own noise
        batch = data.batch(cl.Route("general", -1, (1, 0)), "cpu")
        assert torch.equal(batch.target, torch.cat(data.general_targets[1::-1])) and batch.teacher_adapter is None
        calls.clear()
        assert cl.prepare(build_tiny_pipeline(0), dataclasses.replace(cfg, warmup=0), cl.read_teachers(cfg.teachers), general)[1] \
            .general_targets == [] and calls == []  # the paper's loop (no warm start): the general stream is DMD alone


def linear_to_zero(lr: float, steps: int) -> list:
    """The oracle: torch's own LinearLR from lr to 0 over `steps` updates, the lr of each."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    schedule, lrs = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.0, total_iters=steps), []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    return lrs


@pytest.mark.parametrize("lr_decay", [False, True])
def test_the_warm_start_lr_falls_as_torchs_linear_schedule_then_the_lr_is_constant_or_falls_to_0(teachers, tmp_path, monkeypatch, lr_decay):
    cfg = tiny_config(teachers, tmp_path, warmup=6, max_steps=10, gen_every=1, p_switch=1.0, warmup_lr=1e-2, lr=1e-3, critic_lr=2e-3,
                      lr_decay=lr_decay)
    seen, update, step_of = [], cl.apply_update, cl.train_step
    monkeypatch.setattr(cl, "train_step", lambda step, *a: seen.append(("step", step)) or step_of(step, *a))
    monkeypatch.setattr(cl, "apply_update", lambda loss, opt, clip: seen.append(opt.param_groups[0]["lr"]) or update(loss, opt, clip))
    cl.train(cfg)
    lrs = {}  # step -> [the lr of each update in it: the student's, then the critic's]
    for s in seen:
        lrs.setdefault(s[1], []) if isinstance(s, tuple) else lrs[max(lrs)].append(s)
    assert [lrs[s] for s in range(6)] == [[pytest.approx(e, rel=1e-12)] for e in linear_to_zero(1e-2, 6)]  # the student alone
    student = linear_to_zero(1e-3, 4) if lr_decay else [1e-3] * 4  # --lr_decay: to 0 at max_steps; else constant, as the paper
    assert [lrs[s] for s in range(6, 10)] == [[pytest.approx(e, rel=1e-12), 2e-3] for e in student]  # the critic's stays constant


def test_lr_decay_with_a_run_that_is_all_warm_start_trains_and_exports(teachers, tmp_path):
    cfg = tiny_config(teachers, tmp_path, warmup=3, max_steps=3, lr_decay=True)  # no step after the warm start to decay over
    assert (cl.train(cfg) / "pytorch_lora_weights.safetensors").is_file()

# ---- base pipelines: a local folder, image sizes ----

def test_a_saved_pipeline_folder_loads_as_base_exactly(tmp_path):
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "base")
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]  # the Qwen-Image-Edit-2509 layout
    loaded = cl.load_pipeline(str(tmp_path / "base"), torch.device("cpu"), torch.float32)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.processor, cl.ImageOnlyProcessor)  # built by us: no torchvision needed
    assert torch.equal(transformer_out(loaded.transformer), transformer_out(pipe.transformer))
    image = random_image(torch.Generator().manual_seed(0))  # tokenizer, processor, text encoder, VAE, scheduler:
    assert torch.equal(cl.sample(loaded, image, "Make it blue", steps=2, output_type="pt"),
                       cl.sample(pipe, image, "Make it blue", steps=2, output_type="pt"))


def test_image_size_knobs_set_the_pipeline_image_areas(teachers, tmp_path):
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen
    with cl.tiny_image_sizes(condition=1000, vae=2000):  # whatever the caller set
        for kw, expected in [({"base": "tiny"}, (64 ** 2, 64 ** 2)), ({"base": "tiny", "image_size": 32}, (64 ** 2, 32 ** 2)),
                             ({"base": "my/base"}, (1000, 2000)),  # 0 = leave the pipeline's areas alone
                             ({"base": "my/base", "image_size": 96, "condition_size": 128}, (128 ** 2, 96 ** 2))]:
            with cl.image_sizes(cl.Config(**kw)):
                assert (qwen.CONDITION_IMAGE_SIZE, qwen.VAE_IMAGE_SIZE) == expected, kw
            assert (qwen.CONDITION_IMAGE_SIZE, qwen.VAE_IMAGE_SIZE) == (1000, 2000)
    # and a run uses them: teacher targets and the preview at 32 x 32 (2 x 2 latent patches) instead of 64 x 64
    out = tmp_path / "out"
    cl.train(tiny_config(teachers, out, image_size=32, max_steps=1, teacher_steps=2))
    assert {tuple(torch.load(p, weights_only=True).shape) for p in (out / "cache" / "targets").glob("*.pt")} == {(1, 4, 16)}
    left, top = 6 * len("sketch") + 6, 14  # effect names, column titles
    assert Image.open(out / "preview.png").size == (left + 3 * 96 + 2 * 2, top + 3 * 96 + 2 * 2)  # 32 px pictures enlarged 3x


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


def test_with_sources_half_the_effect_steps_after_the_warm_start_draw_them_without_targets_the_same_on_every_rank():
    """sources/ (README: sources without teacher outputs): a coin per step, shared by the ranks (--fsdp runs one graph), sends half
    the effect steps after the warm start to images/ + sources/ (pool on_policy) with no teacher outputs; without sources the
    draws are those of before."""
    plain = cl.Router(3, [4, 4, 8], 5, p_switch=0.5, route_every=4, seed=0)
    assert [plain.route(s) for s in range(400)] == [cl.Router(3, [4, 4, 8], 5, 0.5, 4, seed=0, on_policy=[], warmup=50).route(s)
                                                    for s in range(400)]
    assert all(r.targets for r in (plain.route(s) for s in range(400)))
    router, rank1 = (cl.Router(3, [4, 4, 8], 5, 0.5, 4, seed=0, batch_size=8, rank=k, on_policy=[9, 2, 4], warmup=100) for k in (0, 1))
    routes = [router.route(s) for s in range(4000)]
    assert all(r.targets for r in routes[:100])  # the warm start is flow matching on teacher outputs: only images/
    effect = [r for r in routes[100:] if r.stream == "effect"]
    assert abs(sum(not r.targets for r in effect) / len(effect) - 0.5) < 0.03
    for e, (n_images, n_all) in enumerate([(4, 9), (4, 2), (8, 4)]):
        assert {s for r in effect if r.effect == e and r.targets for s in r.sources} == set(range(n_images))
        assert {s for r in effect if r.effect == e and not r.targets for s in r.sources} == set(range(n_all))
    assert [r.targets for r in routes] == [rank1.route(s).targets for s in range(4000)]  # ranks: one coin, their own draws
    assert [r.sources for r in routes] != [rank1.route(s).sources for s in range(4000)]


def test_adapter_init_depends_on_the_seed_only():
    cfg = cl.Config(rank=4, alpha=4)
    weights = []
    for burn in (0, 1000):  # a different global RNG history before the adapters are added
        pipe = build_tiny_pipeline(0)
        torch.rand(burn)
        cl.add_trainable_adapters(pipe.transformer, cfg)
        weights.append(torch.cat([p.flatten() for p in cl.adapter_params(pipe.transformer, "student")]))
    assert torch.equal(weights[0], weights[1]) and weights[0].abs().sum() > 0


def test_batch_sources_extend_the_single_draw():
    one = cl.Router(4, [9] * 4, 5, p_switch=0.5, route_every=3, seed=0)
    eight = cl.Router(4, [9] * 4, 5, p_switch=0.5, route_every=3, seed=0, batch_size=8)
    for s in range(300):  # batch_size 1 is the paper's run unchanged; a batch only adds draws after the first
        r1, r8 = one.route(s), eight.route(s)
        assert (r8.stream, r8.effect, r8.sources[0]) == (r1.stream, r1.effect, r1.sources[0]) and len(r8.sources) == 8
    assert len({i for s in range(300) for i in eight.route(s).sources}) > 5


def test_a_padded_batch_predicts_what_each_edit_predicts_alone():
    """Prompts of different lengths are right-padded and masked: every sample of the batch must get the
    velocity it gets alone, or batching would change what the student learns."""
    pipe = build_tiny_pipeline(0)
    image = Image.new("RGB", (64, 64), (200, 30, 90))
    inputs = [cl.encode(pipe, image, p) for p in ("Invert", "Make it look like an old photograph, please", "")]
    assert len({c.embeds.shape[1] for c in inputs}) == 3  # really different lengths
    batch = cl.stack(inputs, torch.device("cpu"))
    x = torch.randn(3, *inputs[0].image_latents.shape[1:], generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(0.7)
    with torch.no_grad():
        together = cl.predict_v(pipe.transformer, x, sigma, batch)
        alone = torch.cat([cl.predict_v(pipe.transformer, x[i:i + 1], sigma, c) for i, c in enumerate(inputs)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_chosen_triggers_are_more_orthogonal_than_naive_ones():
    pipe = build_tiny_pipeline(0)
    effects = [cl.Effect(f"fx{i}", "Apply the effect to the image", Path("x"), []) for i in range(6)]
    report = cl.choose_triggers(pipe, effects, seed=0)
    assert report["chosen_max_cos"] < report["naive_max_cos"] - 0.01
    empty = cl.prompt_embedding(pipe, "")
    embs = torch.stack([cl.prompt_embedding(pipe, e.student_prompt) - empty for e in effects])
    assert cl.max_pairwise_cosine(embs) == pytest.approx(report["chosen_max_cos"], abs=1e-6)
    assert len({e.trigger for e in effects}) == 6 and all(e.student_prompt.startswith(e.trigger) for e in effects)


def test_without_aop_the_student_prompt_is_the_instruction_even_when_effects_share_it(teachers, tmp_path, capsys):
    shutil.copytree(teachers / "teachers", tmp_path / "teachers")
    for name in ("glow", "sketch"):  # one instruction for two effects; their own triggers are ignored by the ablation
        (tmp_path / "teachers" / name / "effect.json").write_text(json.dumps({"instruction": "Make it pop",
                                                                              "trigger": f"<{name}>"}))
    lora = cl.train(tiny_config(tmp_path, tmp_path / "out", general=str(teachers / "general"), aop=False,
                                max_steps=1, teacher_steps=2))
    meta = json.loads((lora / "collectionlora.json").read_text())
    assert meta["config"]["aop"] is False
    assert {e["name"]: e["student_prompt"] for e in meta["effects"]} == {e["name"]: e["teacher_instruction"]
                                                                         for e in meta["effects"]}
    assert [e["student_prompt"] for e in meta["effects"]].count("Make it pop") == 2
    assert all(e["trigger"] == "" for e in meta["effects"])
    assert "--no-aop: 2 of 3 effects share their student prompt" in capsys.readouterr().out


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
    for b0, b1 in zip(before, after):  # the target is a sample from its own noise: the teacher's own spread stays in b1
        assert b1 < 0.9 * b0, (before, after)


def test_teacher_targets_and_encodings_are_cached(teachers, trained, monkeypatch):
    cfg = tiny_config(teachers, trained[0])
    pipe = build_tiny_pipeline(0)
    effects = cl.read_teachers(cfg.teachers)
    bank = cl.TeacherBank(effects, pipe, cfg.cache)
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("teacher re-run despite the cache"))
    y = cl.teacher_target(pipe, bank, 0, effects[0].images[0], cfg, pipe.scheduler)[0]
    assert y.shape == (1, 16, 16) and torch.isfinite(y).all()
    fresh = cl.encode(pipe, Image.open(effects[0].images[0]).convert("RGB"), effects[0].instruction)
    monkeypatch.setattr(type(pipe), "encode_prompt", lambda *a, **k: pytest.fail("text encoder re-run despite the cache"))
    cached = cl.cached_encode(pipe, effects[0].images[0], effects[0].instruction, cfg)
    assert torch.equal(cached.embeds, fresh.embeds) and torch.equal(cached.image_latents, fresh.image_latents)


def test_another_base_in_the_same_cache_encodes_and_computes_its_targets_afresh(teachers, trained, monkeypatch):
    """The cache keys hold the base's weights, not --base's name: --base tiny with another --seed (or a base changed in place)
    must not read the encodings and teacher targets of the trained run (seed 0) from its cache; the same base under
    another name (a copy elsewhere) must."""
    cfg = tiny_config(teachers, trained[0])
    effects, n_targets = cl.read_teachers(cfg.teachers), len(list((cfg.cache / "targets").glob("*.pt")))
    image, text = effects[0].images[0], effects[0].instruction
    pipes = [build_tiny_pipeline(seed) for seed in (0, 1)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    fresh = [cl.encode(pipe, Image.open(image).convert("RGB"), text).embeds for pipe in pipes]
    assert not torch.equal(fresh[0], fresh[1])  # the two bases do differ
    assert all(torch.equal(cl.cached_encode(pipe, image, text, cfg).embeds, f) for pipe, f in zip(pipes, fresh))
    y = [cl.teacher_target(pipe, cl.TeacherBank(effects, pipe, cfg.cache), 0, image, cfg, pipe.scheduler)[0] for pipe in pipes]
    assert len(list((cfg.cache / "targets").glob("*.pt"))) == n_targets + 1 and not torch.equal(*y)  # seed 0's was cached
    monkeypatch.setattr(type(pipes[0]), "encode_prompt", lambda *a, **k: pytest.fail("text encoder re-run for a renamed base"))
    renamed = dataclasses.replace(cfg, base=str(trained[0] / "a copy of the base"))
    assert torch.equal(cl.cached_encode(build_tiny_pipeline(0), image, text, renamed).embeds, fresh[0])


def test_every_teacher_target_starts_from_its_own_noise_and_again_from_the_same(teachers, tmp_path, monkeypatch):
    """One noise for every source made most targets of a multi-modal effect one mode (LAB_NOTES: the teacher targets' noise)."""
    noises, prepare_latents = [], QwenImageEditPlusPipeline.prepare_latents
    monkeypatch.setattr(QwenImageEditPlusPipeline, "prepare_latents",
                        lambda *a, **k: (out := prepare_latents(*a, **k), noises.append(out[0].clone()))[0])
    images = [teachers / "general" / f"{j}.png" for j in range(3)]  # three sources of one size

    def starting_noises(seed, out):
        cfg = tiny_config(teachers, out, seed=seed)
        pipe = build_tiny_pipeline(0)
        pipe.set_progress_bar_config(disable=True)
        bank = cl.TeacherBank(cl.read_teachers(cfg.teachers), pipe, cfg.cache)
        noises.clear()
        targets = [cl.teacher_target(pipe, bank, i, p, cfg, pipe.scheduler)[0] for i in range(2) for p in images]
        return torch.cat(noises), torch.cat(targets)
    first, targets = starting_noises(0, tmp_path / "a")
    assert first.shape == targets.shape == (6, 16, 16)
    assert all(not torch.equal(first[i], first[j]) for i in range(6) for j in range(i))  # each (effect, source): its own
    again, same_targets = starting_noises(0, tmp_path / "b")  # a fresh cache: computed again, to the same noise and target
    assert torch.equal(first, again) and torch.equal(targets, same_targets)
    other, _ = starting_noises(1, tmp_path / "c")  # --seed changes every target's noise
    assert all(not torch.equal(x, y) for x, y in zip(first, other))


def test_k_targets_per_source_each_its_own_noise_every_one_drawn_with_its_own_source(tmp_path, monkeypatch):
    """--targets_per_image K: K teacher outputs per (effect, source), output 0 the K = 1 target itself; the router's pool holds
    all n * K of them, and a batch pairs each with the inputs of the source it was made from (LAB_NOTES: one target per source).
    A source's K come from ONE batched call of the stock pipeline, each output its seed's own call to rounding."""
    make_tiny_teachers(tmp_path / "teachers", tmp_path / "general", n_images=2, effects=EFFECTS[:2])
    router, prepare, sample, sizes, made, calls = cl.Router, cl.prepare, cl.sample, [], [], []
    monkeypatch.setattr(cl, "Router", lambda n, pool_sizes, *a, **k: sizes.append(pool_sizes) or router(n, pool_sizes, *a, **k))
    monkeypatch.setattr(cl, "prepare", lambda *a, **k: made.append(prepare(*a, **k)) or made[-1])

    def batched(pipe, image, text, steps, seeds, *rest, **kw):  # a target's call against each seed's own, in the same pipe state
        y = sample(pipe, image, text, steps, seeds, *rest, **kw)
        if isinstance(seeds, list):  # not the preview's student
            calls.append((len(seeds), (y - torch.cat([sample(pipe, image, text, steps, s, *rest) for s in seeds])).abs().max().item()))
        return y
    monkeypatch.setattr(cl, "sample", batched)
    cl.train(tiny_config(tmp_path, tmp_path / "k3", targets_per_image=3, max_steps=2, warmup=2))
    monkeypatch.setattr(cl, "sample", sample)
    assert sizes == [[6, 6]]  # 2 sources x 3 targets per effect
    n_general = len(cl.read_inputs(tiny_config(tmp_path, tmp_path / "unused"))[1])  # the general pictures
    assert sorted(n for n, _ in calls) == [1] * n_general + [3] * 4  # general: one each; effects: one call per source
    assert all(d == 0 if n == 1 else d < 1e-5 for n, d in calls), calls  # one seed: bit for bit the plain call
    _, data, _ = made[0]
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    cfg1 = tiny_config(tmp_path, tmp_path / "k1", cache_dir=str(tmp_path / "fresh"))  # K = 1, computed afresh
    bank1 = cl.TeacherBank(cl.read_teachers(cfg1.teachers), pipe, cfg1.cache)
    cfg3 = tiny_config(tmp_path, tmp_path / "k3", targets_per_image=3)  # the run's cache: its K targets, in j's order
    for i, pool in enumerate(data.pools):
        mine = {(p, j): y for (e, p, j), y in data.targets.items() if e == i}
        assert len(mine) == 6 and all(not torch.equal(a, b) for a, b in itertools.combinations(mine.values(), 2))
        assert all(torch.allclose(mine[p, 0], cl.teacher_target(pipe, bank1, i, p, cfg1, pipe.scheduler)[0], atol=1e-5) for p in pool)
        assert all(torch.allclose(mine[p, j], cl.teacher_target(pipe, bank1, i, p, cfg3, pipe.scheduler)[j], atol=1e-5)
                   for p in pool for j in range(3))
        latents = {p: data.effect_inputs[i, p][0].image_latents for p in pool}
        assert not torch.equal(*latents.values())  # else the pairing below would prove nothing
        drawn = []
        for s in range(6):
            b = data.batch(cl.Route("effect", i, (s,)), "cpu")
            (p, j), = [key for key, y in mine.items() if torch.equal(y, b.target)]
            assert torch.equal(b.student.image_latents, latents[p])
            drawn.append((p, j))
        assert sorted(drawn) == sorted(mine)


def test_sources_get_no_teacher_output_and_train_with_the_dmd_term_alone(tmp_path, monkeypatch):
    """An effect's sources/ are encoded, never given a teacher output (cost: nothing per source), and drawn after the warm
    start by the steps without targets, whose student update is the DMD term alone (README: sources without teacher outputs)."""
    make_tiny_teachers(tmp_path / "teachers", tmp_path / "general", n_images=2, effects=EFFECTS[:2])
    images = sorted((tmp_path / "teachers" / "glow" / "images").iterdir())
    (tmp_path / "teachers" / "glow" / "sources").mkdir()
    rng = torch.Generator().manual_seed(5)
    sources = [tmp_path / "teachers" / "glow" / "sources" / f"s{j}.png" for j in range(3)]
    for path in sources:
        random_image(rng, Image.open(images[0]).size[0]).save(path)
    target_of, prepare, asked, made = cl.teacher_target, cl.prepare, [], []
    monkeypatch.setattr(cl, "teacher_target", lambda pipe, bank, i, path, *a, **k: asked.append(Path(path)) or target_of(
        pipe, bank, i, path, *a, **k))
    monkeypatch.setattr(cl, "prepare", lambda *a, **k: made.append(prepare(*a, **k)) or made[-1])
    cfg = tiny_config(tmp_path, tmp_path / "out", max_steps=30, warmup=6, gen_every=1, p_switch=1.0, route_every=1, log_every=1)
    cl.train(cfg)
    assert asked and not set(asked) & set(sources)  # every image/ got its targets, no source one
    _, data, _ = made[0]
    assert data.on_policy[0] == images + sources and data.on_policy[1] == data.pools[1]
    assert all(torch.equal(data.effect_inputs[0, p][0].image_latents,
                           cl.cached_encode(build_tiny_pipeline(0), p, data.effects[0].student_prompt, cfg).image_latents) for p in sources)
    b = data.batch(cl.Route("effect", 0, (2, 3, 4), targets=False), "cpu")  # on_policy[2:5]: the three sources
    assert b.target is None and b.teacher_adapter == "teacher"
    assert torch.equal(b.student.image_latents, torch.cat([data.effect_inputs[0, p][0].image_latents for p in sources]))
    pipe = build_tiny_pipeline(0)
    cl.TeacherBank(data.effects, pipe, cfg.cache).swap(0)
    cl.add_trainable_adapters(pipe.transformer, cfg)
    assert set(cl.student_loss(pipe.transformer, b, cl.student_sigmas(8, 3.0), cfg, torch.Generator().manual_seed(0))) == {"dmd"}
    log = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    router = cl.Router(2, [2, 2], len(data.general_inputs), 1.0, 1, cfg.seed, on_policy=[5, 2], warmup=6)
    assert [set(line) >= {"ts", "fm"} for line in log[6:]] == [router.route(line["step"] - 1).targets for line in log[6:]]
    assert {True, False} == {router.route(line["step"] - 1).targets for line in log[6:]}  # both kinds were trained


def test_exported_lora_reproduces_the_student_in_a_stock_pipeline(teachers, trained):
    out, lora = trained
    meta = json.loads((lora / "collectionlora.json").read_text())
    image = Image.open(next((teachers / "teachers").glob("*/images/*.png"))).convert("RGB")
    prompt = meta["effects"][0]["student_prompt"]
    # the in-memory student: the trained weights from the last checkpoint, on a pipeline with all adapters
    cfg = tiny_config(teachers, out)
    live = build_tiny_pipeline(0)
    live.set_progress_bar_config(disable=True)
    cl.add_trainable_adapters(live.transformer, cfg)
    state = torch.load(sorted((out / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    set_peft_model_state_dict(live.transformer, state["student"], adapter_name="student")
    cl.use_adapter(live.transformer, "student")
    live.scheduler = cl.student_scheduler(cfg)
    stock = build_tiny_pipeline(0)
    stock.set_progress_bar_config(disable=True)
    load_student(stock, lora)
    a = cl.sample(live, image, prompt, seed=3, output_type="pt")
    b = cl.sample(stock, image, prompt, seed=3, output_type="pt")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    base = build_tiny_pipeline(0)
    base.scheduler = cl.student_scheduler(cfg)
    base.set_progress_bar_config(disable=True)
    assert (cl.sample(base, image, prompt, seed=3, output_type="pt") - a).abs().max() > 1e-3  # the LoRA matters


def test_preview_shows_source_teacher_target_and_the_exported_student(teachers, trained, tmp_path, monkeypatch):
    out, lora = trained
    seeds, sample = [], cl.sample  # the seed each teacher target was drawn with: computed again in a fresh cache
    monkeypatch.setattr(cl, "sample", lambda *a, **k: (seeds.extend(a[4]), sample(*a, **k))[1])
    pipe = build_tiny_pipeline(0)
    pipe.set_progress_bar_config(disable=True)
    bank = cl.TeacherBank(effects := cl.read_teachers(teachers / "teachers"), pipe, tmp_path)
    for i, e in enumerate(effects):  # the trained run's config (the key's inputs), another cache
        cl.teacher_target(pipe, bank, i, e.images[0], tiny_config(teachers, out, cache_dir=str(tmp_path)), pipe.scheduler)
    monkeypatch.undo()
    assert len(set(seeds)) == len(effects)
    grid = Image.open(out / "preview.png")
    left, top = 6 * len("sketch") + 6, 14  # the longest effect name on the left, column titles on top
    assert grid.size == (left + 3 * 64 + 2 * 2, top + 3 * 64 + 2 * 2) and not (out / "preview.tmp").exists()  # 2 px gaps
    pixels = np.asarray(grid.convert("RGB"))
    assert (pixels[top + 64: top + 66, left:] == 255).all() and (pixels[top:, left + 130: left + 132] == 255).all()
    assert (pixels[top:, :left] < 128).any() and (pixels[:top, left:] < 128).any()  # names and titles are written

    def cell(row, col):
        return pixels[top + 66 * row: top + 66 * row + 64, left + 66 * col: left + 66 * col + 64]
    stock = build_tiny_pipeline(0)  # the exported student, reloaded: exactly the student column
    stock.set_progress_bar_config(disable=True)
    load_student(stock, lora)
    prompts = [e["student_prompt"] for e in json.loads((lora / "collectionlora.json").read_text())["effects"]]
    for row, e in enumerate(cl.read_teachers(teachers / "teachers")):
        image = Image.open(e.images[0]).convert("RGB")
        assert (cell(row, 0) == np.asarray(image.resize((64, 64), Image.LANCZOS))).all()
        student = np.abs(cell(row, 2).astype(int) - np.asarray(cl.sample(stock, image, prompts[row], seed=0)[0]).astype(int))
        assert student.max() <= 1 and (student > 0).mean() < 0.01, student.max()  # one adapter vs three: float rounding
        teacher = build_tiny_pipeline(0)  # the teacher column: diffusers' own LoRA loading and CFG call
        teacher.set_progress_bar_config(disable=True)
        teacher.load_lora_weights(str(e.lora_file))
        expected = teacher(image=image, prompt=e.instruction, negative_prompt="", true_cfg_scale=5.0, height=64, width=64,
                           num_inference_steps=8, generator=torch.Generator().manual_seed(seeds[row])).images[0]
        diff = np.abs(cell(row, 1).astype(int) - np.asarray(expected).astype(int))
        assert diff.max() <= 1, diff.max()  # the rank-padded slot equals diffusers' loading up to float rounding


def test_stock_scheduler_visits_exactly_the_trained_sigmas(trained):
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = build_tiny_pipeline(0)
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


# ---- ComfyUI: the file, its strength, the sampler ----

@pytest.fixture(scope="module")
def exported_alpha(teachers, tmp_path_factory):
    """A student exported with alpha != rank (scale 1/4): the case where a file without .alpha tensors loads wrong."""
    with cl.tiny_image_sizes():
        out = tmp_path_factory.mktemp("alpha")
        lora = cl.train(tiny_config(teachers, out, max_steps=6, gen_every=1, rank=8, alpha=2.0, lr=3e-2, critic_lr=3e-2))
    meta = json.loads((lora / "collectionlora.json").read_text())
    return lora, lora / meta["comfyui"]["file"], meta


def comfyui_unloaded_keys(lora: dict, model_keys) -> list:
    """The keys ComfyUI would leave unloaded, by its rule as read in Comfy-Org/ComfyUI: model_lora_keys_unet
    (comfy/lora.py) maps the LoRA name 'diffusion_model.<m>' to the model weight 'diffusion_model.<m>.weight' for
    every model (the generic names; only newer releases' QwenImage branch adds '<m>' and 'transformer.<m>', so those
    are left out here); load_lora then takes '<x>.alpha', and LoRAAdapter.load (comfy/weight_adapter/lora.py)
    '<x>.lora_up.weight' with '<x>.lora_down.weight' (or lora_B / lora_A); any other key is 'lora key not loaded'."""
    names, loaded = {"diffusion_model." + k.removesuffix(".weight") for k in model_keys if k.endswith(".weight")}, set()
    for x in names:
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if x + up in lora:
                loaded |= {x + up, x + down} | ({x + ".alpha"} & set(lora))
                break
    return sorted(set(lora) - loaded)


def test_the_comfyui_file_is_all_mapped_by_comfyui_and_merges_at_the_diffusers_strength(exported_alpha):
    lora, comfy_file, meta = exported_alpha
    comfy = load_file(str(comfy_file))
    base = build_tiny_pipeline(0).transformer
    assert comfyui_unloaded_keys(comfy, base.state_dict()) == [] and len(comfy) == 3 * 28  # 28 LoRA modules
    assert comfyui_unloaded_keys({"transformer_blocks.0.attn.to_q.lora_up.weight": 0}, base.state_dict()) != []  # it can fail
    stock = build_tiny_pipeline(0)
    stock.load_lora_weights(str(lora))  # the diffusers file, alpha from its peft config
    stock.fuse_lora(lora_scale=1.0)
    fused, merged = stock.transformer.state_dict(), 0
    for name, W in base.state_dict().items():  # ComfyUI's merge at strength 1: W + (alpha / rank) up @ down
        x = "diffusion_model." + name.removesuffix(".weight")
        if x + ".alpha" in comfy:
            up, down = comfy[x + ".lora_up.weight"], comfy[x + ".lora_down.weight"]
            assert comfy[x + ".alpha"].item() == 2.0 and down.shape[0] == 8
            expected = W + comfy[x + ".alpha"].item() / down.shape[0] * up @ down
            fused_W = fused[name.removesuffix(".weight") + ".base_layer.weight"]  # peft keeps the merged weight there
            torch.testing.assert_close(fused_W, expected, rtol=0, atol=1e-6)
            merged += (expected - W).abs().max().item() > 1e-4  # the student is not zero
    assert merged > 0
    assert meta["comfyui"]["file"] in meta["files"]["comfyui"] and (lora / "pytorch_lora_weights.safetensors").is_file()
    assert meta["prompts"] == {e["name"]: e["student_prompt"] for e in meta["effects"]}


def test_diffusers_reads_the_comfyui_file_to_the_same_outputs(teachers, exported_alpha):
    lora, comfy_file, meta = exported_alpha
    image = Image.open(next((teachers / "teachers").glob("*/images/*.png"))).convert("RGB")
    prompt = meta["effects"][0]["student_prompt"]
    outputs = []
    for how in (lambda p: load_student(p, lora), lambda p: p.load_lora_weights(str(comfy_file)), lambda p: None):
        pipe = build_tiny_pipeline(0)
        pipe.set_progress_bar_config(disable=True)
        how(pipe)
        pipe.scheduler = cl.student_scheduler(cl.Config())
        outputs.append(cl.sample(pipe, image, prompt, seed=3, output_type="pt"))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=1e-5)  # lora_state_dict folds .alpha for Qwen
    assert (outputs[2] - outputs[0]).abs().max() > 1e-3  # the LoRA matters


def test_the_comfyui_file_read_back_as_a_teacher_is_the_student(exported_alpha, tmp_path):
    lora, comfy_file, meta = exported_alpha
    folder = tmp_path / "teachers" / "student"
    (folder / "images").mkdir(parents=True)
    shutil.copy(comfy_file, folder)
    random_image(torch.Generator().manual_seed(0)).save(folder / "images" / "0.png")
    (folder / "effect.json").write_text(json.dumps({"instruction": meta["effects"][0]["student_prompt"]}))
    pipe = build_tiny_pipeline(0)
    bank = cl.TeacherBank(cl.read_teachers(tmp_path / "teachers"), pipe, tmp_path / "cache")  # our own reader
    bank.swap(0)
    cl.use_adapter(pipe.transformer, "teacher")
    stock = build_tiny_pipeline(0)
    load_student(stock, lora)
    expected = transformer_out(stock.transformer)
    torch.testing.assert_close(transformer_out(pipe.transformer), expected, rtol=0, atol=1e-5)
    assert (expected - transformer_out(build_tiny_pipeline(0).transformer)).abs().max() > 1e-4


def test_comfyui_lcm_with_the_simple_schedule_is_the_student_sampler(exported_alpha):
    """ComfyUI, read in Comfy-Org/ComfyUI: ModelSamplingAuraFlow(shift) builds ModelSamplingDiscreteFlow (comfy/
    model_sampling.py) with the table sigmas[i] = time_snr_shift(shift, (i + 1) / 1000), i < 1000; scheduler 'simple'
    (comfy/samplers.py) takes sigmas[-(1 + int(x * 1000 / steps))] for x < steps, then 0; sampler 'lcm' sets x to the
    model's x0 and, while the next sigma > 0, x = noise_scaling(s, noise, x) = s noise + (1 - s) x (CONST, flow)."""
    comfy = exported_alpha[2]["comfyui"]
    shift, steps = comfy["model_sampling"]["shift"], comfy["ksampler"]["steps"]
    assert (comfy["ksampler"]["sampler_name"], comfy["ksampler"]["scheduler"], comfy["ksampler"]["cfg"]) == ("lcm", "simple", 1.0)
    t = torch.arange(1, 1001, dtype=torch.float32) / 1000
    table = shift * t / (1 + (shift - 1) * t)
    simple = torch.tensor([table[-(1 + int(x * len(table) / steps))].item() for x in range(steps)] + [0.0])
    torch.testing.assert_close(simple[:-1], cl.student_sigmas(8, 3.0), rtol=0, atol=1e-6)
    assert comfy["sigmas_exact"]
    # the lcm loop on the student, with the same noise draws, reaches backward_simulation's sample
    pipe = build_tiny_pipeline(0)
    load_student(pipe, exported_alpha[0])
    g = torch.Generator().manual_seed(5)
    c = cl.EditInputs(torch.randn(1, 7, 16, generator=g), None, torch.randn(1, 16, 16, generator=g), [[(1, 4, 4), (1, 4, 4)]])
    g.manual_seed(9)
    x = torch.randn(1, 16, 16, generator=g)
    with torch.no_grad():
        for i in range(steps):
            x = x - simple[i] * cl.predict_v(pipe.transformer, x, simple[i], c)  # the model's x0 (CONST)
            if simple[i + 1] > 0:
                x = simple[i + 1] * torch.randn(x.shape, generator=g) + (1 - simple[i + 1]) * x
    reference = cl.backward_simulation(pipe.transformer, c, cl.student_sigmas(8, 3.0), 8, g.manual_seed(9))
    torch.testing.assert_close(x, reference, rtol=0, atol=1e-5)


# ---- extending a collection: --init, --replay ----

def test_an_exported_student_reloads_as_init_exactly(teachers, trained):
    out, lora = trained
    pipe = build_tiny_pipeline(0)
    cl.add_trainable_adapters(pipe.transformer, tiny_config(teachers, out, init=str(lora)))
    stock = build_tiny_pipeline(0)
    load_student(stock, lora)
    expected = transformer_out(stock.transformer)
    for adapter in ("student", "critic"):  # before any step: the exported student, and the critic starts as it
        cl.use_adapter(pipe.transformer, adapter)
        torch.testing.assert_close(transformer_out(pipe.transformer), expected, rtol=0, atol=1e-6)  # float rounding
    assert (expected - transformer_out(build_tiny_pipeline(0).transformer)).abs().max() > 1e-3  # the LoRA matters


def test_extending_keeps_the_old_prompts_and_records_which_run_added_each_effect(teachers, trained, tmp_path):
    out, lora = trained
    new = tmp_path / "new"
    make_tiny_teachers(new, None, n_images=1, effects=[("blur", "Blur the picture", 4, 4.0)])
    shutil.copytree(teachers / "teachers" / "glow", tmp_path / "replay" / "glow")
    cfg = tiny_config(teachers, tmp_path / "ext", teachers=str(new), init=str(lora), replay=str(tmp_path / "replay"),
                      max_steps=4, p_switch=1.0, replay_p=0.5)
    meta = json.loads((cl.train(cfg) / "collectionlora.json").read_text())
    before = {e["name"]: e for e in json.loads((lora / "collectionlora.json").read_text())["effects"]}
    after = {e["name"]: e for e in meta["effects"]}
    assert set(after) == set(before) | {"blur"}
    for name, e in before.items():
        assert (after[name]["trigger"], after[name]["student_prompt"], after[name]["added_by"]) == \
            (e["trigger"], e["student_prompt"], str(out)), name
    assert after["blur"]["added_by"] == cfg.out and after["blur"]["trigger"] not in {e["trigger"] for e in before.values()}
    assert meta["prompts"] == {name: e["student_prompt"] for name, e in after.items()}
    assert set(meta["router_visits"]) == {"glow", "blur", "general"}  # the replayed effect is trained on, by its old prompt
    visits = collections.Counter(cl.Router(2, [1, 1], 0, 1.0, 1, 0, 1, 1, 0.25).route(s).effect for s in range(4000))
    assert abs(visits[0] / 4000 - 0.25) < 0.03  # replay_p: the replayed (first) effect's share of the effect periods


def test_new_triggers_avoid_the_prompts_the_student_already_knows(teachers):
    pipe = build_tiny_pipeline(0)
    known = [f"<{i:04d}_old_Ab{i:04d}> Turn it into a sketch" for i in range(6)]
    empty = cl.prompt_embedding(pipe, "")
    worst = lambda p: max(torch.nn.functional.cosine_similarity(cl.prompt_embedding(pipe, p) - empty,
                                                                cl.prompt_embedding(pipe, k) - empty, 0).item() for k in known)
    alone, aware = (cl.read_teachers(teachers / "teachers")[:1] for _ in range(2))
    cl.choose_triggers(pipe, alone, seed=0)
    cl.choose_triggers(pipe, aware, seed=0, others=known)
    assert alone[0].trigger != aware[0].trigger and worst(aware[0].student_prompt) < worst(alone[0].student_prompt)


def lora_tensors(lora_dir: Path) -> dict:
    return load_file(str(lora_dir / "pytorch_lora_weights.safetensors"))


def test_same_seed_and_inputs_give_a_bit_identical_student(teachers, tmp_path):
    a = lora_tensors(cl.train(tiny_config(teachers, tmp_path / "a", max_steps=6)))
    b = lora_tensors(cl.train(tiny_config(teachers, tmp_path / "b", max_steps=6)))  # own cache: targets recomputed
    c = lora_tensors(cl.train(tiny_config(teachers, tmp_path / "a", max_steps=6, seed=1, overwrite=True)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # it trained at all
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and the seed matters
    meta = json.loads((tmp_path / "a" / "lora" / "collectionlora.json").read_text())  # --overwrite replaced run a
    assert meta["config"]["seed"] == 1 and set(meta["versions"]) >= {"torch", "diffusers", "peft", "transformers"}
    assert [e["teacher_sha256_16"] for e in meta["effects"]] == [cl.file_hash(e.lora_file) for e in
                                                                  cl.read_teachers(teachers / "teachers")]


def test_the_normalised_teachers_cache_is_found_again_by_another_process(teachers, tmp_path):
    """The cache names hold a tag of the base; once it hashed diffusers' `_use_default_values`, which lists its keys in set order,
    changing with the process's hash seed (found by examples/bench_teachers.py: every run normalised every teacher again)."""
    code = ("import sys; sys.path.insert(0, 'examples'); import collectionlora as cl; "
            "from make_tiny_teachers import build_tiny_pipeline; from pathlib import Path; "
            "pipe = build_tiny_pipeline(0); "
            f"bank = cl.TeacherBank(cl.read_teachers({str(teachers / 'teachers')!r}), pipe, Path({str(tmp_path)!r})); "
            "print(sorted(f.name for f in bank.files))")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2", "3")]  # side by side
    names = {proc.communicate(timeout=300)[0] for proc in procs}
    assert len(names) == 1 and len(list((tmp_path / "loras").iterdir())) == 3, names


def test_a_changed_teacher_file_invalidates_only_its_cached_targets(teachers, tmp_path, monkeypatch):
    shutil.copytree(teachers / "teachers", tmp_path / "teachers")
    cfg = tiny_config(tmp_path, tmp_path / "out")
    calls, run_teacher = [], QwenImageEditPlusPipeline.__call__
    monkeypatch.setattr(QwenImageEditPlusPipeline, "__call__", lambda *a, **k: calls.append(1) or run_teacher(*a, **k))

    def targets():
        pipe = build_tiny_pipeline(0)
        pipe.set_progress_bar_config(disable=True)
        effects = cl.read_teachers(cfg.teachers)
        bank = cl.TeacherBank(effects, pipe, cfg.cache)
        return [cl.teacher_target(pipe, bank, i, e.images[0], cfg, pipe.scheduler)[0] for i, e in enumerate(effects)]
    first = targets()
    assert len(calls) == 3
    lora = sorted((tmp_path / "teachers").glob("*/*.safetensors"))[0]  # the first effect's LoRA file, changed
    with safe_open(str(lora), "pt") as f:
        metadata = f.metadata()
    save_file({k: v * 2 for k, v in load_file(str(lora)).items()}, str(lora), metadata=metadata)
    second = targets()
    assert len(calls) == 4  # only the changed teacher ran again
    assert not torch.equal(first[0], second[0]) and all(torch.equal(x, y) for x, y in zip(first[1:], second[1:]))


def test_non_finite_losses_are_skipped_then_stop_with_a_checkpoint(teachers, tmp_path, capsys):
    cfg = tiny_config(teachers, tmp_path, lr=1e30, gen_every=1, p_switch=1.0, max_nonfinite=3)  # diverges at once
    with pytest.raises(cl.Stopped, match=r"3 steps in a row had a non-finite loss \(last: student \(dmd.*on '"):
        cl.train(cfg)
    assert "non-finite loss in student" in capsys.readouterr().out  # each skipped step is reported
    checkpoint = sorted((tmp_path / "checkpoints").glob("step_*.pt"))[-1]
    state = torch.load(checkpoint, weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["critic"].values())  # skipped updates did not poison it


# ---- CLI, bad input and faults ----

def cli(*args, env=None):
    """The CLI in a real process, started and not waited for: most of its time is importing torch, so tests start
    several side by side. Read it with .communicate()."""
    return subprocess.Popen([sys.executable, str(ROOT / "collectionlora.py"), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def test_cli_help_lists_every_config_knob(capsys):  # in this process: the real-process tests below run the entry point
    with pytest.raises(SystemExit) as e:
        cl.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"--{f.name}" in out for f in cl.dataclasses.fields(cl.Config))


def in_effect(how, effect="ink_sketch"):
    """A case that changes one effect folder (of a copy of examples/tiny_teachers) and adds no flag."""
    return lambda root: how(root / "teachers" / effect) and []


def lora_of(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def replace_lora(tensors: dict):
    return in_effect(lambda d: save_file(tensors, str(lora_of(d))) or True)


def make_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def same_trigger(root: Path) -> list:
    for name in ("ink_sketch", "neon_edges"):
        (root / "teachers" / name / "effect.json").write_text(json.dumps({"instruction": name, "trigger": "<fx>"}))
    return []


def old_export(root: Path, rank: int = 4, base: str = "tiny", name: str = "old_fx", trigger: str = "<old>",
               lora: bytes | None = None) -> list:
    """--init pointing at an export's files (a collectionlora.json like a rank-4, alpha-128 tiny run writes)."""
    folder = make_folder(root / "old")
    save_file({}, str(folder / "pytorch_lora_weights.safetensors"))
    if lora is not None:  # a broken LoRA file instead
        (folder / "pytorch_lora_weights.safetensors").write_bytes(lora)
    (folder / "collectionlora.json").write_text(json.dumps({"base": base, "effects": [
        {"name": name, "trigger": trigger, "student_prompt": f"{trigger} Do the old thing"}], "config": {
        "rank": rank, "alpha": 128.0, "target_modules": list(cl.QWEN_TARGET_MODULES), "out": "runs/old"}}))
    return ["--init", str(folder)]


def trigger_of(root: Path, effect: str, trigger: str) -> Path:
    (root / "teachers" / effect / "effect.json").write_text(json.dumps({"instruction": effect, "trigger": trigger}))
    return root


Q = "transformer.transformer_blocks.0.attn.to_q"  # a module of the tiny base: Linear(48, 48)
BAD_INPUT = {  # case: (change a good setup in place, returning extra CLI flags; the message expected)
    "teachers missing": (lambda r: ["--teachers", ""], "--teachers is required"),
    "teachers not a folder": (lambda r: ["--teachers", str(r / "general" / "0.txt")], "is not a folder"),
    "teachers empty": (lambda r: ["--teachers", str(make_folder(r / "empty"))], "has no effect sub-folders"),
    "teachers is one effect": (lambda r: ["--teachers", str(r / "teachers" / "ink_sketch")], "looks like ONE effect"),
    "no LoRA file": (in_effect(lambda d: lora_of(d).rename(d / "lora.bin")), "found 0 -- keep one (.bin/.pt/.ckpt"),
    "not safetensors": (in_effect(lambda d: lora_of(d).write_text("<html>404</html>")),
                        "is not a readable safetensors LoRA"),
    "truncated LoRA": (in_effect(lambda d: lora_of(d).write_bytes(lora_of(d).read_bytes()[:3000])),
                       "is not a readable safetensors LoRA"),
    "LoRA for another base": (replace_lora({f"transformer.single_transformer_blocks.0.attn.to_q.lora_{x}.weight":
                                            torch.zeros(4, 4) for x in "AB"}),
                              "1 of its LoRA layers are not in the base transformer (e.g. "
                              "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight)"),
    "LoRA shapes do not fit": (replace_lora({f"{Q}.lora_A.weight": torch.zeros(4, 32), f"{Q}.lora_B.weight": torch.zeros(48, 4)}),
                               "'transformer_blocks.0.attn.to_q' has LoRA shapes (48, 4) x (4, 32), the base needs (48, r) x (r, 48)"),
    "NaN in LoRA": (replace_lora({f"{Q}.lora_A.weight": torch.full((4, 48), float("nan")),
                                  f"{Q}.lora_B.weight": torch.zeros(48, 4)}), "holds NaN/inf weights"),
    "effect.json missing": (in_effect(lambda d: (d / "effect.json").unlink() or True), "has no effect.json"),
    "effect.json not JSON": (in_effect(lambda d: (d / "effect.json").write_text("{instruction: x")), "effect.json is not valid"),
    "effect.json no instruction": (in_effect(lambda d: (d / "effect.json").write_text('{"trigger": "x"}')),
                                   "has no 'instruction'"),
    "same trigger twice": (same_trigger, "effects 'ink_sketch' and 'neon_edges' share the trigger '<fx>'"),
    "zero-size image": (in_effect(lambda d: (d / "images" / "0.png").write_bytes(b"") or True), "0.png cannot be read"),
    "unreadable image": (in_effect(lambda d: (d / "images" / "0.png").write_bytes(b"\x89PNG garbage")), "0.png cannot be read"),
    "empty image folder": (in_effect(lambda d: [p.unlink() for p in (d / "images").iterdir()]), "holds no images"),
    "general nowhere": (lambda r: ["--general", str(r / "nowhere")], "--general '"),
    "previous run in out": (lambda r: make_folder(r / "out" / "lora") and [], "holds a previous run"),
    "resume without checkpoint": (lambda r: ["--resume"], "--resume: no checkpoint"),
    "resume and overwrite": (lambda r: ["--resume", "--overwrite"], "--resume and --overwrite contradict"),
    "out is a file": (lambda r: ["--out", str(r / "general" / "0.txt")], "is a file"),
    "batch of mixed sizes": (lambda r: Image.new("RGB", (96, 64)).save(r / "teachers" / "ink_sketch" / "images" / "1.png")
                             or ["--batch_size", "2"], "--batch_size 2 needs one image size per folder"),
    "sources/ of another size": (lambda r: make_folder(r / "teachers" / "ink_sketch" / "sources") and Image.new("RGB", (96, 64)).save(
        r / "teachers" / "ink_sketch" / "sources" / "s.png") or ["--batch_size", "2"], "--batch_size 2 needs one image size per folder"),
    "unreadable source image": (in_effect(lambda d: make_folder(d / "sources") and (d / "sources" / "s.png").write_bytes(b"") or True),
                                "sources/s.png cannot be read"),
    "max_steps 0": (lambda r: ["--max_steps", "0"], "--max_steps 0 is invalid"),
    "p_switch 1.5": (lambda r: ["--p_switch", "1.5"], "--p_switch 1.5 is invalid"),
    "negative lr": (lambda r: ["--lr=-1e-4"], "--lr -0.0001 is invalid"),
    "NaN guidance": (lambda r: ["--guidance", "nan"], "--guidance nan is invalid"),
    "image_size not a multiple of 32": (lambda r: ["--image_size", "40"], "--image_size 40 is invalid"),
    "negative condition_size": (lambda r: ["--condition_size=-32"], "--condition_size -32 is invalid"),
    "negative warmup": (lambda r: ["--warmup=-5"], "--warmup -5 is invalid"),
    "not a number": (lambda r: ["--max_steps", "ten"], "argument --max_steps: invalid int value: 'ten'"),
    "base folder is not a pipeline": (lambda r: ["--base", str(r / "general")], "is not a diffusers pipeline folder"),
    "init not an export": (lambda r: ["--init", str(r / "general")], "--init '"),
    "init for another base": (lambda r: old_export(r, base="Qwen/Qwen-Image-Edit-2509"),
                              "was made with --base Qwen/Qwen-Image-Edit-2509, this run has tiny"),
    "init for another rank": (lambda r: old_export(r, rank=8), "was made with --rank 8, this run has 4"),
    "init LoRA not safetensors": (lambda r: old_export(r, lora=b"<html>"), "is not a collectionlora export (SafetensorError"),
    "new effect named like an old one": (lambda r: old_export(r, name="ink_sketch"),
                                         "new effect 'ink_sketch' collides with 'ink_sketch' of --init"),
    "new trigger collides with an old one": (lambda r: old_export(trigger_of(r, "neon_edges", "<old>")),
                                             "new effect 'neon_edges' collides with 'old_fx' of --init"),
    "replay without init": (lambda r: ["--replay", str(r / "teachers")], "--replay needs --init"),
    "init with no-aop": (lambda r: old_export(r) + ["--no-aop"], "--init keeps the old student prompts -- drop --no-aop"),
    "replay of an effect not in init": (lambda r: old_export(r) + ["--replay", str(r / "teachers")],
                                        "--replay effect 'ink_sketch' is not in the --init collection (old_fx)"),
    "replay_p above 1": (lambda r: ["--replay_p", "2"], "--replay_p 2.0 is invalid"),
    "dtype not bf16/fp32": (lambda r: ["--dtype", "fp16"], "--dtype fp16 is invalid"),
    "negative preview_every": (lambda r: ["--preview_every", "-1"], "--preview_every -1 is invalid"),
    "out too small for its checkpoints": (lambda r: ["--keep_checkpoints", str(10 ** 12)],
                                          "MiB free, its checkpoints and export need about"),
}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    shutil.copytree(ROOT / "examples" / "tiny_teachers", tmp_path / "teachers")
    shutil.copytree(ROOT / "examples" / "tiny_general", tmp_path / "general")
    change, message = BAD_INPUT[case]
    extra = change(tmp_path)
    before = snapshot(tmp_path)
    args = ["--base", "tiny", "--teachers", str(tmp_path / "teachers"), "--general", str(tmp_path / "general"),
            "--out", str(tmp_path / "out"), "--rank", "4", "--teacher_steps", "2", *extra]
    try:
        code = cl.main(args)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert " -- " in err  # every message says what to do
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


def test_cli_bad_input_in_a_real_process(tmp_path):
    cases = [(["--teachers", "does/not/exist"], {}, "--teachers 'does/not/exist' is not a folder"),
             (["--teachers", "examples/tiny_teachers", "--max_steps", "ten"], {}, "invalid int value: 'ten'"),
             (["--teachers", "examples/tiny_teachers", "--base", "Qwen/Not-A-Model"], {"HF_HUB_OFFLINE": "1"},
              "--base 'Qwen/Not-A-Model' could not be loaded")]
    procs = [cli(*([] if "--base" in args else ["--base", "tiny"]), *args, "--out", str(tmp_path / f"out{i}"), env=env)
             for i, (args, env, _) in enumerate(cases)]  # side by side
    for i, (proc, (_, _, message)) in enumerate(zip(procs, cases)):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / f"out{i}").exists()


def start_run(root: Path, out: Path, *extra):
    """The CLI in a real process, in an empty working directory, printing a line per step."""
    cwd = root / "cwd"
    cwd.mkdir(exist_ok=True)
    args = ["--base", "tiny", "--teachers", str(root / "teachers"), "--general", str(root / "general"), "--out", str(out),
            "--rank", "8", "--alpha", "8", "--lr", "1e-3", "--critic_lr", "1e-3", "--route_every", "5",
            "--teacher_steps", "8", "--log_every", "1", *extra]
    return subprocess.Popen([sys.executable, str(ROOT / "collectionlora.py"), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_step(proc, step: int):
    for line in proc.stdout:
        if line.startswith(f"step {step}/"):
            return
    pytest.fail(f"the run ended before step {step}: {proc.stderr.read()}")


def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(teachers, tmp_path):
    signals = {signal.SIGINT: 130, signal.SIGTERM: 143}  # one run each, side by side
    procs = {sig: start_run(teachers, tmp_path / sig.name, "--max_steps", "10000", "--save_every", "10000") for sig in signals}
    for sig, proc in procs.items():
        wait_for_step(proc, 3)
        proc.send_signal(sig)
    for sig, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == signals[sig], err
        last = err.strip().splitlines()[-1]
        assert f"{sig.name}: stopped after step" in last and "--resume" in last
        step = int(last.split("after step ")[1].split(",")[0])
        assert step >= 3 and (tmp_path / sig.name / "checkpoints" / f"step_{step:08d}.pt").is_file()
    assert not list((teachers / "cwd").iterdir())  # nothing written outside --out


def test_kill_9_then_resume_equals_an_uninterrupted_run(teachers, tmp_path):
    straight = start_run(teachers, tmp_path / "straight", "--max_steps", "40", "--save_every", "5")  # the same, never killed
    proc = start_run(teachers, tmp_path / "out", "--max_steps", "40", "--save_every", "5")
    wait_for_step(proc, 12)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL and (tmp_path / "out" / "checkpoints" / "step_00000010.pt").is_file()
    assert not (tmp_path / "out" / "lora").exists()
    proc = start_run(teachers, tmp_path / "out", "--max_steps", "40", "--save_every", "5", "--resume")
    stdout, err = proc.communicate(timeout=600)  # a hang guard only: under a loaded 2-core machine 120 s was not enough
    assert proc.returncode == 0, err
    assert f"wrote {tmp_path / 'out' / 'preview.png'} -- one row per effect (first 16): source | teacher output | " \
           "student 8-step output" in stdout
    _, err = straight.communicate(timeout=600)
    assert straight.returncode == 0, err
    resumed, straight = lora_tensors(tmp_path / "out" / "lora"), lora_tensors(tmp_path / "straight" / "lora")
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert not list((teachers / "cwd").iterdir())


# ---- Scale: precision, gradient checkpointing, long runs, full disks, torchrun ----

def test_a_bf16_base_under_cpu_autocast_trains_finite_fp32_loras_that_reload(teachers, tmp_path):
    """The CUDA path's precision (bf16 base and autocast, fp32 LoRA weights), exercised on the CPU."""
    cfg = tiny_config(teachers, tmp_path, dtype="bf16", max_steps=6, gen_every=1, log_every=1, p_switch=1.0)
    device, dtype, autocast = cl.device_setup(cfg)
    assert (device.type, dtype, autocast.fast_dtype, autocast._enabled) == ("cpu", torch.bfloat16, torch.bfloat16, True)
    assert cl.device_setup(tiny_config(teachers, tmp_path))[1] == torch.float32  # the CPU default
    lora = cl.train(cfg)
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 7)) and all(np.isfinite(v) for r in logs for k, v in r.items()
                                                                  if k in ("dmd", "ts", "fm", "critic"))
    tensors = lora_tensors(lora)
    assert {t.dtype for t in tensors.values()} == {torch.float32} and any(t.abs().sum() > 0 for k, t in tensors.items()
                                                                         if "lora_B" in k)
    stock = build_tiny_pipeline(0)
    load_student(stock, lora)
    image = Image.open(cl.read_teachers(cfg.teachers)[0].images[0]).convert("RGB")
    assert torch.isfinite(cl.sample(stock, image, "x", output_type="latent")).all()


def test_gradient_checkpointing_gives_the_gradients_of_a_plain_backward(teachers, tmp_path):
    cfg = tiny_config(teachers, tmp_path)
    pipe = build_tiny_pipeline(0)
    bank, data, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), [])
    cl.add_trainable_adapters(pipe.transformer, cfg)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    b, sigmas = data.batch(cl.Route("effect", 0, (0,)), "cpu"), cl.student_sigmas(8, 3.0)
    bank.swap(0)
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            pipe.transformer.enable_gradient_checkpointing()
        pipe.transformer.zero_grad(set_to_none=True)
        sum(cl.student_loss(pipe.transformer, b, sigmas, cfg, torch.Generator().manual_seed(3)).values()).backward()
        grads.append({n: p.grad.clone() for n, p in pipe.transformer.named_parameters() if p.grad is not None})
    assert pipe.transformer.is_gradient_checkpointing and grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


def test_previews_while_training_and_log_jsonl_change_nothing_and_survive_a_resume(teachers, tmp_path):
    plain = lora_tensors(cl.train(tiny_config(teachers, tmp_path / "plain", max_steps=8, log_every=1)))
    watched = lora_tensors(cl.train(tiny_config(teachers, tmp_path / "w", max_steps=8, log_every=1, preview_every=4,
                                                save_every=4, keep_checkpoints=5)))
    assert all(torch.equal(plain[k], watched[k]) for k in plain)  # watching does not change the run
    out = tmp_path / "w"
    assert Image.open(out / "preview_4.png").size == Image.open(out / "preview_8.png").size == Image.open(out / "preview.png").size
    assert not list(out.glob("preview_[!48]*.png")) and not list(out.rglob("*.tmp"))
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(1, 9)) and {"stream", "effect", "critic", "s_step"} <= logs[0].keys()
    # every line has the student's losses of its last update (gen_every 5: steps 1 and 6), as the terminal shows them
    assert [r["dmd"] for r in logs[:5]] == [logs[0]["dmd"]] * 5 and logs[5]["dmd"] != logs[0]["dmd"]
    assert logs == [json.loads(line) | {"s_step": r["s_step"]} for line, r in
                    zip((tmp_path / "plain" / "log.jsonl").read_text().splitlines(), logs)]
    # a crash after steps 5..8 were logged, before their checkpoint: the resumed run logs them once, as before
    (out / "checkpoints" / "step_00000008.pt").unlink()
    (out / "lora").rename(tmp_path / "lora_before")
    with (out / "log.jsonl").open("a") as f:
        f.write(json.dumps({"step": 9, "stream": "stale"}) + '\n{"step": 10, "str')  # and a line the crash cut short
    resumed = lora_tensors(cl.train(tiny_config(teachers, out, max_steps=8, log_every=1, resume=True)))
    again = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == list(range(1, 9))
    assert [{k: v for k, v in r.items() if k != "s_step"} for r in again] == [{k: v for k, v in r.items() if k != "s_step"}
                                                                             for r in logs]
    assert all(torch.equal(plain[k], resumed[k]) for k in plain)


def test_a_full_disk_is_one_line_leaves_no_tmp_and_resume_continues(teachers, tmp_path):
    """A real write failure: the file-size limit (RLIMIT_FSIZE; writes past it fail with EFBIG, as a full disk fails with
    ENOSPC) set between the size of the warm-up's checkpoint (no critic Adam state yet) and of the later ones."""
    kw = dict(max_steps=4, warmup=2, save_every=2, keep_checkpoints=5, cache_dir=str(tmp_path / "cache"))
    straight = lora_tensors(cl.train(tiny_config(teachers, tmp_path / "straight", **kw)))
    sizes = [p.stat().st_size for p in sorted((tmp_path / "straight" / "checkpoints").glob("step_*.pt"))]
    assert sizes[0] < sizes[1]
    args = ["--base", "tiny", "--teachers", str(teachers / "teachers"), "--general", str(teachers / "general"),
            "--out", str(tmp_path / "out"), "--rank", "8", "--alpha", "8", "--lr", "1e-3", "--critic_lr", "1e-3",
            "--route_every", "5", "--teacher_steps", "8", "--max_steps", "4", "--warmup", "2", "--save_every", "2",
            "--keep_checkpoints", "5", "--cache_dir", str(tmp_path / "cache")]
    limit = (sizes[0] + sizes[1]) // 2
    code = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); import collectionlora as cl; "
            f"sys.exit(cl.main({args!r}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith("disk full: writing step_00000004 to ") and "MiB are free" in last, r.stderr
    assert str(tmp_path / "out" / "checkpoints") in last and "--resume" in last
    assert [p.name for p in (tmp_path / "out").rglob("*") if ".tmp" in p.name] == []
    assert [p.name for p in (tmp_path / "out" / "checkpoints").iterdir()] == ["step_00000002.pt"]
    resumed = lora_tensors(cl.train(tiny_config(teachers, tmp_path / "out", resume=True, **kw)))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def _in_group(rank, port, fn, *args):
    torch.set_num_threads(1)  # forked after the parent's OpenMP pool started: a parallel region here would wait for ever
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cl.dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, *args)  # its models are freed when it returns: before the group goes, or a rank can hang at exit
    finally:
        cl.dist.destroy_process_group()


def on_two_ranks(fn, *args) -> None:
    """fn(rank, *args) in 2 gloo ranks, forked (no re-import: 0.2 s, against 18 s spawned)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.start_processes(_in_group, args=(port, fn, *args), nprocs=2, start_method="fork")


def _average(rank, tmp):
    a, b, unused = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad, b.grad = torch.full((3,), rank + 1.0), torch.tensor([2.0 * rank, 0, 0])  # `unused`: no gradient
    finite_both = cl.average_gradients([a, b, unused], finite=True)
    results = [finite_both, a.grad.tolist(), b.grad.tolist(), unused.grad.tolist()]
    a.grad = torch.ones(3)
    results.append([cl.average_gradients([a], finite=rank == 0), a.grad.isnan().all().item()])  # rank 1: NaN loss
    torch.save(results, Path(tmp) / f"{rank}.pt")


def test_gradients_are_averaged_over_ranks_and_a_non_finite_rank_skips_the_update_everywhere(tmp_path):
    on_two_ranks(_average, str(tmp_path))
    for rank in (0, 1):
        ok, a, b, unused, (skip, nan) = torch.load(tmp_path / f"{rank}.pt")
        assert ok and a == [1.5] * 3 and b == [1.0, 0, 0] and unused == [0.0] * 3
        assert skip and nan  # apply_update then sees a non-finite norm on both ranks and skips


def _real_score(rank: int, tmp: str, root: str, sharded: bool = True) -> None:
    """Teacher `rank` swapped into the slot, the real score of a fixed call saved; sharded: one of 2 FSDP2 ranks (--fsdp's layout)."""
    pipe = build_tiny_pipeline(0)
    bank = cl.TeacherBank(cl.read_teachers(Path(root) / "teachers"), pipe, Path(tmp) / f"cache{rank}")
    cl.add_trainable_adapters(pipe.transformer.requires_grad_(False), tiny_config(Path(root), Path(tmp)))
    if sharded:
        cl.shard(pipe.transformer, torch.float32)
    bank.swap(rank)
    cl.use_adapter(pipe.transformer, "teacher")
    torch.save(transformer_out(pipe.transformer), Path(tmp) / f"{'fsdp' if sharded else 'one'}{rank}.pt")


def test_fsdp_ranks_on_different_teachers_each_get_their_own_teachers_real_score(teachers, tmp_path):
    on_two_ranks(_real_score, str(tmp_path), str(teachers))
    for rank in (0, 1):
        _real_score(rank, str(tmp_path), str(teachers), sharded=False)
    one, fsdp = ([torch.load(tmp_path / f"{kind}{r}.pt") for r in (0, 1)] for kind in ("one", "fsdp"))
    assert not torch.allclose(one[0], one[1], atol=1e-3)  # two different teachers: a slot sharded over the ranks would mix them
    assert all(torch.allclose(f, o, rtol=1e-5, atol=1e-6) for f, o in zip(fsdp, one)), [(f - o).abs().max() for f, o in zip(fsdp, one)]


def torchrun(tmp_path, out: Path, *extra, nproc=2):
    """The CLI under torchrun on the CPU (gloo), in its own process group; returns the Popen."""
    args = ["--base", "tiny", "--teachers", str(ROOT / "examples" / "tiny_teachers"), "--general",
            str(ROOT / "examples" / "tiny_general"), "--out", str(out), "--rank", "4", "--alpha", "4", "--teacher_steps",
            "4", "--route_every", "5", "--log_every", "1", "--cache_dir", str(tmp_path / "cache"), *extra]
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                             str(ROOT / "collectionlora.py"), *args], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,  # each rank this process's threads: its targets are
                            env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})  # compared bit for bit


def test_torchrun_two_ranks_train_one_student_write_once_fsdp_too_and_refuse_bad_input_once(tmp_path):
    # three real runs side by side (most of a child's time is importing): data parallel, --fsdp (its own cache), bad input
    proc = torchrun(tmp_path, tmp_path / "out", "--max_steps", "10", "--save_every", "5", "--preview_every", "10")
    sharded = torchrun(tmp_path, tmp_path / "fsdp", "--max_steps", "10", "--save_every", "5", "--fsdp",
                       "--cache_dir", str(tmp_path / "fsdp_cache"))
    bad = torchrun(tmp_path, tmp_path / "bad", "--max_steps", "-1")
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err  # the run also checked that both ranks ended with the same student
    assert stdout.count("wrote ") == 2 and stdout.count("AOP: ") == 1  # rank 0 alone reports and writes
    assert sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir()) == ["step_00000005.pt", "step_00000010.pt"]
    assert len(torch.load(tmp_path / "out" / "checkpoints" / "step_00000010.pt", weights_only=True)["gen"]) == 2
    assert (tmp_path / "out" / "preview_10.png").is_file() and not list((tmp_path / "out").rglob("*.tmp"))
    config = json.loads((tmp_path / "out" / "lora" / "collectionlora.json").read_text())["config"]
    one = lora_tensors(cl.train(cl.Config(**config | {"out": str(tmp_path / "one"), "cache_dir": str(tmp_path / "one_cache"),
                                                      "target_modules": cl.QWEN_TARGET_MODULES})))
    two = lora_tensors(tmp_path / "out" / "lora")
    assert one.keys() == two.keys() and any(not torch.equal(one[k], two[k]) for k in one)  # rank 1's gradients count
    split, alone = (sorted((tmp_path / c / "targets").iterdir()) for c in ("cache", "one_cache"))  # the targets the ranks
    assert [p.name for p in split] == [p.name for p in alone] and len(split) == 6  # shared out equal one process's own
    assert all(torch.equal(torch.load(a, weights_only=True), torch.load(b, weights_only=True)) for a, b in zip(split, alone))
    stock = build_tiny_pipeline(0)
    load_student(stock, tmp_path / "out" / "lora")  # the export reloads
    # --fsdp: the same run sharded ends where data parallel ends; resumed from its first checkpoint, it ends bit for bit there again
    stdout, err = sharded.communicate(timeout=600)
    assert sharded.returncode == 0 and stdout.count("wrote ") == 2, err
    fsdp = lora_tensors(tmp_path / "fsdp" / "lora")
    assert fsdp.keys() == two.keys() and all(torch.allclose(fsdp[k], two[k], rtol=1e-4, atol=1e-6) for k in two)
    shutil.rmtree(tmp_path / "fsdp" / "lora")
    (tmp_path / "fsdp" / "checkpoints" / "step_00000010.pt").unlink()
    sharded = torchrun(tmp_path, tmp_path / "fsdp", "--max_steps", "10", "--save_every", "5", "--fsdp", "--resume",
                       "--cache_dir", str(tmp_path / "fsdp_cache"))
    # beside it: a checkpoint of 2 ranks is refused by 1 process
    single = cli("--base", "tiny", "--teachers", str(ROOT / "examples" / "tiny_teachers"), "--general",
                 str(ROOT / "examples" / "tiny_general"), "--out", str(tmp_path / "out"), "--rank", "4", "--alpha", "4",
                 "--teacher_steps", "4", "--cache_dir", str(tmp_path / "cache"), "--resume", "--max_steps", "20")
    _, err = sharded.communicate(timeout=600)
    assert sharded.returncode == 0 and (resumed := lora_tensors(tmp_path / "fsdp" / "lora")).keys() == fsdp.keys(), err
    assert all(torch.equal(resumed[k], fsdp[k]) for k in fsdp)
    load_student(stock, tmp_path / "fsdp" / "lora")  # and reloads
    _, err = single.communicate(timeout=600)
    assert single.returncode == 2 and "was written by 2 processes, this run has 1" in err, err
    _, err = bad.communicate(timeout=600)  # bad input is reported once, with exit 2 on every rank
    assert bad.returncode != 0 and err.count("error: --max_steps -1 is invalid") == 1 and "exitcode: 2" in err, err


def test_torchrun_a_dead_rank_stops_the_others_and_resume_continues(tmp_path):
    proc = torchrun(tmp_path, tmp_path / "out", "--max_steps", "100000", "--save_every", "5")
    checkpoints = tmp_path / "out" / "checkpoints"
    for _ in range(1200):
        if list(checkpoints.glob("step_*.pt")) or proc.poll() is not None:
            break
        time.sleep(0.5)
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():  # workers
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks.update({int(v.split(b"=")[1]): int(pid) for v in environ if v.startswith(b"RANK=")})
    assert set(ranks) == {0, 1}, ranks
    os.kill(ranks[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)  # bounded: gloo sees the closed connection, torchrun stops the rest
    assert proc.returncode != 0 and "rank 0: stopped (" in err and "rerun with --resume" in err, err[-3000:]
    step = max(int(p.stem.split("_")[1]) for p in checkpoints.glob("step_*.pt"))
    proc = torchrun(tmp_path, tmp_path / "out", "--max_steps", str(step + 3), "--save_every", "5", "--resume")
    stdout, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and f"resumed from {checkpoints / f'step_{step:08d}.pt'} at step {step}" in stdout, err
    assert (tmp_path / "out" / "lora" / "pytorch_lora_weights.safetensors").is_file()


# ---- examples/effectbench.py: the benchmark's own measuring tools ----

import effectbench as eb  # noqa: E402


def deltas(lora: dict) -> dict:
    """{module: B @ A} of a read_lora dict (scale folded into B)."""
    return {k[:-2]: lora[k[:-2] + ".B"] @ lora[k] for k in lora if k.endswith(".A")}


def test_effectbench_merges_cat_is_the_sum_svd_the_best_low_rank_and_one_teacher_merges_to_itself(teachers, tmp_path):
    effects = [eb.Effect(name, instruction, None, 1) for name, instruction, _, _ in EFFECTS]  # ranks 4, 8, 4
    read = lambda f: deltas(cl.read_lora(f, QwenImageEditPlusPipeline, build_tiny_pipeline(0).transformer))
    each = [read(teachers / "teachers" / e.name / f"{e.name}.safetensors") for e in effects]
    merges = eb.stage_merges(effects, teachers / "teachers", "tiny", tmp_path / "merges")
    cat, svd = read(merges["cat"] / "pytorch_lora_weights.safetensors"), read(merges["svd"] / "pytorch_lora_weights.safetensors")
    truncated = 0
    for module, d in cat.items():
        total = sum(t[module] for t in each)
        assert torch.allclose(d, total, atol=1e-6 * float(total.abs().max()) + 1e-8), module
        # Eckart-Young: the best rank-8 approximation misses exactly the tail of the spectrum
        tail = torch.linalg.svdvals(total)[8:].pow(2).sum()
        assert float((svd[module] - total).pow(2).sum()) == pytest.approx(float(tail), rel=1e-3, abs=1e-9), module
        truncated += bool(tail > 1e-6 * total.pow(2).sum())
    assert truncated > 0  # sum of ranks 16 > 8: some modules really were truncated
    one = eb.stage_merges(effects[:1], teachers / "teachers", "tiny", tmp_path / "one", density=1.0)  # TIES keeps it all
    for m in ("cat", "svd", "ties"):
        merged = read(one[m] / "pytorch_lora_weights.safetensors")
        for module, d in each[0].items():
            assert torch.allclose(merged[module], d, atol=1e-5 * float(d.abs().max()) + 1e-8), (m, module)


def test_effectbench_energy_score_is_zero_for_exact_samples_and_half_the_distance_for_a_blend_or_one_mode():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g)  # two valid outputs of 3 sources
    d = (a - b).pow(2).flatten(1).mean(1).sqrt().mean().item()  # their mean RMS distance
    assert eb.energy_score(torch.cat([a, a]), a[None], 2) == pytest.approx(0.0, abs=1e-7)  # one output, hit by both seeds
    assert eb.energy_score(torch.cat([a, b]), torch.stack([a, b]), 2) == pytest.approx(0.0, abs=1e-6)  # each mode once
    blend = (a + b) / 2  # the mean of the two: no valid output, scored as badly as always the same one
    assert eb.energy_score(torch.cat([blend, blend]), torch.stack([a, b]), 2) == pytest.approx(d / 2, rel=1e-5)
    assert eb.energy_score(torch.cat([a, a]), torch.stack([a, b]), 2) == pytest.approx(d / 2, rel=1e-5)  # one mode only
    assert eb.energy_score(a, a[None], 1) is None  # no spread term from one seed


def test_effectbench_part_2_bar_needs_the_energy_score_below_both_rows_beyond_2_standard_errors():
    row = lambda psnr, energy: {"psnr_valid": psnr, "bad_case": 0.0, "coverage": None, "energy": energy}
    walls = {"seconds_teacher_40_cfg": 1.0, "seconds_collectionlora_8": 0.1}
    rows = {"teacher_40_g1": row(26.0, 0.05), "teacher_8": row(28.0, 0.07), "fm_teacher_8": row(26.0, 0.06),
            "fm_teacher+lightning_8": row(18.0, 0.1), "merge_cat+lightning_8": row(12.0, 0.2), "collectionlora_8": row(25.0, 0.05)}
    noise = [0.001, -0.001, 0.002, -0.002]  # four 4-seed replicates per row (16 seeds); the student's in the other order
    precise = lambda level, jitter, order=1: {"e": {"pooled": level, "replicates": [level + jitter * x for x in noise[::order]]}}
    bar = "energy score (16 seeds) below the teacher's 8 plain steps and FM on its outputs beyond 2 standard errors"
    for ours, jitter, passed in ((0.055, 1, True), (0.0595, 1, False), (0.0575, 0, True), (0.0595, 0, False), (0.061, 1, False)):
        p = {"teacher_8": precise(0.06, 1), "fm_teacher_8": precise(0.062, 1), "collectionlora_8": precise(ours, jitter, -1)}
        assert eb.check_bars(rows, {}, walls, [], p)[bar]["passed"] is passed, (ours, jitter)
    d = [0.0595 - (0.06 + x) for x in noise]  # the paired replicates' differences, by hand: se = their sd / sqrt(4)
    diff, se = eb.energy_difference(p | {"collectionlora_8": precise(0.0595, 0)}, "collectionlora_8", "teacher_8")
    assert diff == pytest.approx(-0.0005) and se == pytest.approx(statistics.stdev(d) / 2)
    assert not any(k.startswith("energy score") for k in eb.check_bars(rows, {}, walls, []))  # no many-seed energy: no bar
    speed = ">= 9x less time per edit than the teacher"  # a 1-step edit of 0.03 s against 0.1 s for 8: 0.01 s a step, 0.02 s fixed
    assert eb.check_bars(rows, {}, walls | {"seconds_collectionlora_1": 0.03}, [])[speed]["numbers"] == \
        "10.0x; an edit's fixed cost 0.020 s = 2.0 student steps (9x needs <= ~1)"


def test_effectbench_energy_and_psnr_replicates_at_4_seeds_are_the_tables_numbers_and_split_more_seeds_into_replicates():
    world = eb.build_world({"tint_any": eb.effect_registry()["tint_any"]}, 0)
    pipe = eb.load_all(eb.TOY / "base", world.effects, eb.TOY / "teachers", {})
    methods = {"teacher_8": eb.Method(lambda e: [e.name]), "base_8": eb.Method(lambda e: [])}
    table = eb.evaluate(world, world.effects, pipe, methods, 4, "teacher_8", quiet=True)["results"]["tint_any"]
    four = eb.energy_replicates(world, world.effects, pipe, methods, 4)["teacher_8"]["tint_any"]
    assert four["pooled"] == four["replicates"][0] == table["teacher_8"]["energy"]  # the same samples as the table's row
    eight = eb.energy_replicates(world, world.effects, pipe, methods, 8)["teacher_8"]["tint_any"]
    assert len(eight["replicates"]) == 2 and sum(eight["shares"]) == pytest.approx(1.0) and 0 <= eight["imbalance"] <= 0.75
    psnr = eb.psnr_replicates(world, world.effects, pipe, methods, 4, "teacher_8")  # the table's rows, as a difference
    gap = psnr["per_effect"]["base_8"]["tint_any"]
    assert psnr["reference"]["tint_any"] == table["teacher_8"]["psnr_valid"] and "teacher_8" not in psnr["per_effect"]
    assert gap == pytest.approx(table["base_8"]["psnr_valid"] - table["teacher_8"]["psnr_valid"], abs=1e-4)
    assert psnr["replicates"]["base_8"] == psnr["effect_replicates"]["base_8"]["tint_any"] == [pytest.approx(gap, abs=1e-4)]
    assert len(eb.psnr_replicates(world, world.effects, pipe, methods, 8, "teacher_8")["replicates"]["base_8"]) == 2


def test_energy_noise_pairs_rows_of_earlier_runs_by_hand_and_refuses_other_seeds(tmp_path, capsys):
    """--earlier: an earlier --out file's rows join this run's; a taken name gets the file's name in front; the paired
    difference and its standard error are those computed by hand; a file at other --seeds is refused (exit 2)."""
    import energy_noise
    row = lambda e1, e2: {"e1": {"pooled": sum(e1) / 2, "replicates": e1}, "e2": {"pooled": sum(e2) / 2, "replicates": e2}}
    (f := tmp_path / "old.json").write_text(json.dumps({"args": {"seeds": 8}, "results": {"a": row([0, 0], [1, 2])}}))
    merged = energy_noise.merge({"a": row([1, 2], [3, 4])}, energy_noise.read_earlier(str(f), 8))
    assert list(merged) == ["a", "old:a"]
    # row replicates (mean over effects): a [2, 3], old:a [0.5, 1]; differences [1.5, 2]: mean 1.75, se sqrt(0.125 / 2)
    diff, se = eb.energy_difference(merged, "a", "old:a")
    assert diff == pytest.approx(1.75) and se == pytest.approx(0.25)
    with pytest.raises(SystemExit) as stop:
        energy_noise.read_earlier(str(f), 128)
    assert stop.value.code == 2 and "--seeds 8" in capsys.readouterr().err


def test_roll_errors_split_recovers_a_known_mix_a_known_bias_and_a_known_spread():
    import roll_errors
    n, D, S = 3, 64, 6
    basis = torch.randn(n, D, 8, generator=torch.Generator().manual_seed(0))
    valid, rms = basis[..., 2], lambda v: v.pow(2).mean(-1).sqrt()
    mixed = (0.7 * basis[..., 2] + 0.3 * basis[..., 3]).expand(S, n, D)  # every sample: 70 % roll 2, 30 % roll 3
    r = roll_errors.split(mixed, valid, basis)
    assert r["mix"] == pytest.approx([0, 0, 0.7, 0.3, 0, 0, 0, 0], abs=1e-3) and r["residual"] < 1e-4 and r["spread"] == 0
    assert r["error"] == pytest.approx(float(rms(0.3 * (basis[..., 3] - basis[..., 2])).mean()), rel=1e-5) == r["bias"]
    c = torch.zeros(n, D); c[:, 0::2] = 0.2  # a fixed miss, and +-noise on the other coordinates (orthogonal to it)
    e = torch.zeros(n, D); e[:, 1::2] = 0.1
    x = valid + c + torch.tensor([1.0, -1.0] * (S // 2))[:, None, None] * e  # seeds alternate +e, -e: their mean is valid + c
    r = roll_errors.split(x, valid, basis)
    assert r["bias"] == pytest.approx(0.2 / 2 ** 0.5, rel=1e-5)  # rms of c: half its coordinates 0.2
    assert r["error"] == pytest.approx((0.2 ** 2 / 2 + 0.1 ** 2 / 2) ** 0.5, rel=1e-5)
    # ordered pairs with opposite signs: S^2 / 2, each 2 rms(e) apart; the spread is half the mean over the S (S - 1) pairs
    assert r["spread"] == pytest.approx(S * S / 2 * 2 * (0.1 / 2 ** 0.5) / (2 * S * (S - 1)), rel=1e-5)
    assert r["energy"] == pytest.approx(r["error"] - r["spread"], abs=1e-7)


def test_effectbench_mode_coverage_is_the_normalised_entropy():
    assert eb.mode_coverage(torch.tensor([0, 1, 2, 3] * 5), 4) == pytest.approx(1.0)
    assert eb.mode_coverage(torch.tensor([2] * 9), 4) == pytest.approx(0.0)
    assert eb.mode_coverage(torch.tensor([0, 3] * 4), 4) == pytest.approx(0.5)  # 2 of 4 equally: log 2 / log 4


def test_effectbench_benchmark_refuses_an_unknown_option():
    with pytest.raises(TypeError, match="unknown option 'effect_steps'"):
        eb.benchmark({"x": ("Do x", lambda im: im)}, 0, effect_steps=3)


def test_effectbench_a_zero_count_is_one_line_exit_2_before_any_stage(tmp_path, capsys):
    for flag in ("--fm_steps", "--distil_steps", "--seeds"):  # --fm_steps 0 and --distil_steps 0 fell back to the defaults
        assert eb.main(["--effects", "2", flag, "0", "--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: {flag} 0 is below 1" in err and not any(tmp_path.iterdir())
    for n in ("6", "4", "-8"):  # part 2's bar needs whole 4-seed replicates, at least two of them
        assert eb.main(["--effects", "2", "--energy_seeds", n, "--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"error: --energy_seeds {n}: pass a multiple of 4 from 8" in err and not any(tmp_path.iterdir())


def test_effectbench_in_parallel_runs_each_stage_in_its_own_process_and_reports_a_failure(tmp_path):
    write = lambda i: (tmp_path / f"{i}.txt").write_text(str(os.getpid()))
    eb.in_parallel(2, [lambda i=i: write(i) for i in range(3)])
    pids = {(tmp_path / f"{i}.txt").read_text() for i in range(3)}
    assert len(pids) == 3 and str(os.getpid()) not in pids  # three stages, three child processes
    with pytest.raises(RuntimeError, match="exit code 3.*--jobs 1"):
        eb.in_parallel(2, [lambda: None, lambda: sys.exit(3)])


def test_effectbench_planned_prompts_are_the_prompts_train_chose(teachers, trained):
    planned = eb.planned_prompts(teachers / "teachers", "tiny", 0)
    assert planned == eb.student_prompts(trained[1])
    assert len(set(planned.values())) == len(EFFECTS)  # one distinct prompt per effect


def test_effectbench_a_row_with_no_adapter_samples_the_base_and_the_next_row_has_its_lora_back():
    """The general-edit rows (base_8, base_40) run with no adapter: exactly the base model without any LoRA loaded; a
    row after them has its LoRA on again (diffusers' set_adapters alone would not switch LoRAs back on)."""
    toy = ROOT / "examples" / "toy"
    e = eb.Effect("invert", "Invert the colours", lambda x, v: 1 - x, 1)
    plain, pipe = eb.load_base(toy / "base"), eb.load_all(toy / "base", [e], toy / "teachers", {})
    images = eb.make_sources(1, 2, seed=0)[1]
    src, p, empty = eb.pack(pipe, images), eb.encode_prompts(pipe, images, [e.instruction] * 2), eb.encode_prompts(pipe, images, [""] * 2)
    noise = torch.randn(src.shape, generator=torch.Generator().manual_seed(0))
    t_sig = eb.teacher_sigmas(pipe.scheduler, 8, src.shape[1])
    row = lambda adapters: eb.run_method(pipe, eb.Method(lambda _: adapters), e, noise, src, p, empty, t_sig)[0]
    with_lora = row(["invert"])
    without = row([])
    assert torch.equal(without, eb.sample_student(plain.transformer, noise, src, p, 8, torch.Generator().manual_seed(2)))
    assert not torch.allclose(without, with_lora, atol=1e-3)
    assert torch.equal(row(["invert"]), with_lora)


def test_effectbench_an_instruction_outside_the_toy_vocabulary_encodes_padded_from_the_data():
    """Everyday words the toy tokenizer never saw become many byte tokens. The padding is sized from the data (a fixed
    48 once failed after five minutes of teacher training), and a row padded for a longer neighbour predicts exactly
    what it predicts alone (the transformer masks the padding)."""
    pipe = eb.load_base(ROOT / "examples" / "toy" / "base")
    images = eb.make_sources(1, 2, seed=0)[1]
    long = "<0417_quokka_Kq3951> Sprinkle whimsical marshmallow confetti across every cloudy afternoon sky"
    both, alone = eb.encode_prompts(pipe, images, [long, ""]), eb.encode_prompts(pipe, images[1:], [""])
    assert both.embeds.shape[1] == int(both.mask[0].sum()) > 48 > int(both.mask[1].sum()) == alone.embeds.shape[1]
    x, src = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(0)), eb.pack(pipe, images[1:])
    with torch.no_grad():
        padded, unpadded = (eb.predict_v(pipe.transformer, x, torch.tensor([0.6]), src, p) for p in (both[1:], alone))
    torch.testing.assert_close(padded, unpadded, rtol=0, atol=1e-5)


@pytest.mark.parametrize("effects, message", [
    ({"a/b": ("Do it", lambda x: x.flip(0))}, "not a plain folder name"),
    ({"a": ("", lambda x: x.flip(0))}, "non-empty instruction"),
    ({"a": ("Do it", lambda x, v: x.flip(0), 0)}, "K must be an integer"),
    ({"a": ("Do it", lambda x: x[:, :8])}, r"picture in \[0, 1\], got \(3, 8, 32\)"),
    ({"a": ("Do it", lambda x: 2 * x)}, r"in \[0, 1\]"),
    ({"a": ("Do it", lambda x: x.no_such_method())}, "fn failed"),
    ({"a": ("Do it", lambda x: 1 - x), "b": ("Do that", lambda x: 1 - x)}, "the same picture"),
    ({"a": ("Do it",)}, r"must be \(instruction, fn\)")])
def test_effectbench_a_bad_effect_set_is_refused_before_any_stage_runs(effects, message, tmp_path):
    with pytest.raises(cl.InputError, match=message):
        eb.benchmark(effects, 0, root=str(tmp_path / "bench"))
    assert not (tmp_path / "bench").exists()


def test_effectbench_images_gives_the_distiller_the_shipped_sources_then_new_ones_and_refuses_too_many(tmp_path):
    """--images K: the same teacher files; the first 32 sources byte for byte those stage_teachers wrote, then
    train[48:], past the general stream's 16; more than the train sources left is refused before any stage runs."""
    flip = {"a": ("Do it", lambda x: x.flip(0))}
    with pytest.raises(cl.InputError, match="--images 241: pass 1 to 240"):
        eb.benchmark(flip, 0, root=str(tmp_path / "bench"), images=241)
    assert not (tmp_path / "bench").exists()
    world, shipped = eb.build_world(flip, 0), tmp_path / "teachers" / "a"
    (shipped / "images").mkdir(parents=True)
    (shipped / "a.safetensors").write_bytes(b"lora bytes")
    (shipped / "effect.json").write_text('{"instruction": "Do it"}')
    for j in range(32):
        eb.to_pil(world.train[j]).save(shipped / "images" / f"{j}.png")
    view = eb.with_images(world, tmp_path / "teachers", tmp_path / "view", 40) / "a"
    assert sorted(p.name for p in view.iterdir()) == ["a.safetensors", "effect.json", "images"]
    assert (view / "a.safetensors").read_bytes() == b"lora bytes"
    assert len(list((view / "images").iterdir())) == 40
    assert all((view / "images" / f"{j}.png").read_bytes() == (shipped / "images" / f"{j}.png").read_bytes() for j in range(32))
    for j, i in ((32, 48), (39, 55)):
        torch.testing.assert_close(eb.from_pil(Image.open(view / "images" / f"{j}.png")), world.train[i], rtol=0, atol=1 / 255)
