"""
CollectionLoRA: Collecting 50 Effects in 1 LoRA via Multi-Teacher On-Policy Distillation
(arXiv 2605.25378) -- a minimal, single-file reference implementation on diffusers + peft.

N effect LoRAs (each a 40-step CFG "teacher" for one image-editing effect) become ONE student LoRA that edits in 8 steps, no CFG:

    every step      critic  <- flow matching on the student's own x0 from a random step of its sampler (fake score)
    every 5th step  student <- DMD:   x0_hat - stopgrad(x0_hat - (fake - real)/|x0_hat - real|)
                               + TS:    the same DMD term on the student's denoising of a noised teacher output
                               + TA-FM: flow matching on the teacher's own output (coarse anchor)
    routing (PDSR)  each period is an effect (its LoRA swapped into the real score) w.p. p_switch, else a general edit (teacher = base)
    prompts (AOP)   teacher sees its instruction; student and critic "<trigger> instruction", triggers chosen for orthogonal prompts

Run (python collectionlora.py --help: every knob; README: a CPU demo, the folders, the memory plan, the result in diffusers/ComfyUI):
    python collectionlora.py --teachers my_effects/ --general my_edits/ --out runs/mine     # GPU, Qwen-Image-Edit-2509
    torchrun --nproc_per_node=8 collectionlora.py --teachers my_effects/ ... [--fsdp]        # 8 GPUs, data parallel [sharded]
    python collectionlora.py --init runs/mine/lora --teachers new/ --replay my_effects/ ...  # add effects to it

Deviations from the official code (causvid/), each on purpose:
 1. Teacher targets ("base_pred"): the teacher's (stock pipeline), each from its own noise (K per source), cached; none for sources/.
 2. All teachers share ONE exact rank-padded `teacher` adapter slot on the base (TeacherBank), in any diffusers format.
 3. PDSR redraws the stream every step as the paper (code: every 20 steps, 0.2-0.3 dB worse on the toy), from (seed, step) alone: exact resume.
 4. Target-simulation inputs come from the last `ts_last_k` student sigmas (code), not tau_max (paper).
 5. CFG is uncond + g(cond - uncond) (g = 5: official cond + 4(cond - uncond)); only the targets' stock true-CFG rescales to the cond norm.
 6. No DMD2 GAN term (the paper drops it: mode collapse with many teachers), no EMA (as official).
 7. Step limit, atomic checkpoints and exact resume; the official loop has neither.
 8. Triggers minimise the largest pairwise cosine of the student prompts' embeddings (paper: random, never measured).
 9. TA-FM: t ~ U[t_dmd, 1000), t_dmd unshifted, then shifted (official: shifted bound, shifted again); coarse: sigma <= 0.5 in 3.4 %/1.3 %.
10. --warmup N (0 = paper): N cheap FM steps on the teachers' outputs (general stream: the base's), lr falling to 0, then critic = student;
    --lr_decay (off = paper, constant): after it the student's lr falls linearly to 0 at max_steps.
11. Many GPUs: data parallel, each rank a whole base; --fsdp: one base sharded (official: FSDP over 4+ GPUs, 3 bases).
"""
import argparse, collections, contextlib, dataclasses, errno, functools, hashlib, importlib, json, os, random, shutil
import signal, sys, threading, time, unittest.mock, warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as qwen
from huggingface_hub.constants import HF_HUB_OFFLINE
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor


class InputError(ValueError):
    """Bad user input: reported as one line and exit code 2, never as a traceback."""


class Stopped(RuntimeError):
    """Training stopped early (a signal, non-finite losses, a full disk); the checkpoints written are kept. `code`: exit status."""
    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ---- Config ----

QWEN_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2", "img_mod.1", "txt_mod.1")


def knob(default, why):
    """A Config field whose help text (shown by --help) is the reason for its default."""
    return dataclasses.field(default=default, metadata={"help": why})


@dataclasses.dataclass
class Config:
    teachers: str = knob("", "folder of effects: one sub-folder per effect (LoRA + effect.json [+ images/, sources/: no teacher output])")
    general: str = knob("", "folder of general edits (image + same-name .txt instruction); feeds the general stream")
    base: str = knob("Qwen/Qwen-Image-Edit-2509", "hub id or local folder of the base pipeline; 'tiny' = random tiny model")
    image_size: int = knob(0, "output (VAE) image side in pixels, a multiple of 32; 0 = the pipeline's 1024 (64 for --base tiny)")
    condition_size: int = knob(0, "side of the image the text encoder sees, a multiple of 32; 0 = 384 (64 for --base tiny)")
    out: str = knob("collectionlora_out", "output folder: lora/, preview.png, checkpoints/, cache/")
    cache_dir: str = knob("", "teacher-target and LoRA cache; empty = <out>/cache")
    seed: int = knob(0, "seeds the model init, the router and all noise")
    init: str = knob("", "continue from an exported student (a run's lora/): its LoRA, triggers and prompts are kept")
    replay: str = knob("", "with --init: teachers of some of its effects, replayed through the router with their old prompts")
    replay_p: float = knob(0.5, "with --replay: the share of effect periods on the replayed effects (toy bench: README)")
    # schedule (paper: 5,000 generator steps = 25,000 iterations at gen_every 5)
    max_steps: int = knob(25000, "iterations (critic updates); the student updates every gen_every")
    gen_every: int = knob(5, "DMD2 two-time-scale rule: student every 5th step, critic every step")
    route_every: int = knob(1, "PDSR redraws the stream every N steps: 1 as the paper (official code 20: 0.2-0.3 dB worse on the toy, README)")
    batch_size: int = knob(1, "edits per step, from one effect's (or the general) images of one size (paper 1); on CPU 8 cost ~1")
    p_switch: float = knob(0.5, "PDSR: probability that a period comes from the effect stream")
    # LoRA and optimiser (official config)
    rank: int = knob(128, "student and critic LoRA rank (paper)")
    alpha: float = knob(128.0, "LoRA alpha; alpha = rank gives scale 1 (paper)")
    target_modules: tuple = knob(QWEN_TARGET_MODULES, "modules that get student/critic LoRA (official Qwen list)")
    lr: float = knob(1e-4, "AdamW lr of the student (paper)")
    critic_lr: float = knob(1e-4, "AdamW lr of the critic (paper)")
    beta1: float = knob(0.9, "AdamW beta1 (official config)")
    beta2: float = knob(0.999, "AdamW beta2 (official config)")
    weight_decay: float = knob(0.0, "not given by the paper; 0 keeps LoRA B from being pulled to zero")
    grad_clip: float = knob(10.0, "grad-norm clip (official config)")
    # sampling and guidance
    student_steps: int = knob(8, "student NFE; the paper's 8-step sampler")
    shift: float = knob(3.0, "static timestep shift of student and training timesteps (official)")
    teacher_steps: int = knob(40, "teacher steps for the cached targets (paper: 40 steps x 2 for CFG)")
    targets_per_image: int = knob(1, "teacher targets per (effect, source), each its own noise (paper 1); 1 made a toy student blend modes")
    guidance: float = knob(5.0, "real-score CFG g (diffusers convention; official 4.0 in cond + g(cond-uncond))")
    # coarse-to-fine objective
    ts_last_k: int = knob(5, "target simulation noises the teacher output to one of the last k student sigmas")
    ts_t_min: float = knob(500.0, "target simulation: DMD timestep drawn from [ts_t_min, 1000) (paper tau_min)")
    w_ts: float = knob(1.0, "weight of the target-simulation DMD term (paper: unweighted)")
    w_fm: float = knob(1.0, "weight of trajectory-anchored flow matching (paper: unweighted)")
    warmup: int = knob(0, "first N steps: cheap flow matching on teacher outputs alone, then the critic starts as the student; 0 = paper")
    warmup_lr: float = knob(0.0, "the student's lr as the warm start begins, falling linearly to 0 at its end; 0 = --lr")
    lr_decay: bool = knob(False, "after the warm start, the student's lr falls linearly from --lr to 0 at max_steps; off = paper")
    aop: bool = knob(True, "AOP: the student sees '<trigger> instruction'; --no-aop (ablation): the teacher's instruction")
    # engineering
    log_every: int = knob(50, "one log line every N steps")
    save_every: int = knob(500, "checkpoint every N steps (atomic)")
    keep_checkpoints: int = knob(2, "keep the last K checkpoints (each holds both LoRAs and both Adam states)")
    resume: bool = knob(False, "continue from the last checkpoint in <out>/checkpoints")
    overwrite: bool = knob(False, "start afresh in an --out that holds a previous run (its cache is kept)")
    max_nonfinite: int = knob(10, "skip steps with a non-finite loss; after this many in a row, checkpoint and stop")
    device: str = knob("auto", "auto = cuda if available (under torchrun: the LOCAL_RANK-th GPU) else cpu")
    dtype: str = knob("auto", "base weights and autocast: auto = bf16 on CUDA, fp32 on CPU; bf16 or fp32 (the LoRAs stay fp32)")
    preview_every: int = knob(0, "also write preview_<step>.png every N steps while training; 0 = only the final preview.png")
    gradient_checkpointing: bool = knob(True, "recompute activations on CUDA to fit rank-128 training on one GPU")
    fsdp: bool = knob(False, "torchrun: shard the base, student, critic and their Adam states over the ranks (FSDP2), for 80 GB GPUs")

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir or Path(self.out) / "cache")


def parse_config(argv=None) -> Config:
    """The CLI is generated from Config: one flag per field, help = the reason for its default."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="example: python collectionlora.py --teachers my_effects/ --general my_edits/ "
                                       "--out runs/mine   (README: the teachers-folder format and a CPU demo)")
    p.error = lambda message: p.exit(2, f"error: {message} -- see --help\n")  # one line, not usage + error (exit 2, as argparse)
    for f in dataclasses.fields(Config):
        how = ({"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else
               {"nargs": "+"} if isinstance(f.default, tuple) else {"type": type(f.default)})
        p.add_argument(f"--{f.name}", default=f.default, help=f.metadata["help"], **how)
    args = vars(p.parse_args(argv))
    return Config(**args | {"target_modules": tuple(args["target_modules"])})


def check_config(c: Config) -> None:
    """Every number in range (NaN fails every comparison, so it is refused too)."""
    rules = {"max_steps": c.max_steps >= 1, "batch_size": c.batch_size >= 1, "p_switch": 0 <= c.p_switch <= 1, "lr": c.lr > 0,
             "critic_lr": c.critic_lr > 0, "rank": c.rank >= 1, "alpha": c.alpha > 0, "gen_every": c.gen_every >= 1,
             "route_every": c.route_every >= 1, "student_steps": c.student_steps >= 1, "shift": c.shift > 0,
             "teacher_steps": c.teacher_steps >= 1, "targets_per_image": c.targets_per_image >= 1, "guidance": c.guidance >= 1,
             "grad_clip": c.grad_clip > 0, "beta1": 0 <= c.beta1 < 1, "beta2": 0 <= c.beta2 < 1, "weight_decay": c.weight_decay >= 0,
             "ts_last_k": 1 <= c.ts_last_k <= c.student_steps, "ts_t_min": 0 <= c.ts_t_min < 1000, "replay_p": 0 <= c.replay_p <= 1,
             "w_ts": c.w_ts >= 0, "w_fm": c.w_fm >= 0, "log_every": c.log_every >= 1, "save_every": c.save_every >= 1,
             "keep_checkpoints": c.keep_checkpoints >= 1, "max_nonfinite": c.max_nonfinite >= 1, "warmup": c.warmup >= 0,
             "warmup_lr": c.warmup_lr >= 0, "preview_every": c.preview_every >= 0, "dtype": c.dtype in ("auto", "bf16", "fp32"),
             "image_size": c.image_size in range(0, 10_000, 32), "condition_size": c.condition_size in range(0, 10_000, 32)}
    for flag in (flag for flag, ok in rules.items() if not ok):
        raise InputError(f"--{flag} {getattr(c, flag)} is invalid -- see `--help` for its meaning and default")
    if not c.teachers:
        raise InputError("--teachers is required -- pass a folder with one sub-folder per effect (see --help)")
    if c.fsdp and int(os.environ.get("WORLD_SIZE", 1)) < 2:
        raise InputError("--fsdp shards the model over processes -- launch with torchrun --nproc_per_node=K (K >= 2), or drop --fsdp")
    if c.resume and c.overwrite:
        raise InputError("--resume and --overwrite contradict each other -- pass one of them")
    if c.replay and not c.init or c.init and not c.aop:  # an extension keeps the old student prompts: AOP's
        raise InputError("--init keeps the old student prompts -- drop --no-aop" if c.init else
                         "--replay needs --init -- pass the exported student (<run>/lora) its effects belong to")


# ---- Flow-matching maths (diffusers' FlowMatchEulerDiscreteScheduler convention) ----

def shift_sigma(sigma, shift: float):
    """Static timestep shift: sigma' = s*sigma / (1 + (s-1)*sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def add_noise(x0, eps, sigma):
    """x_sigma = (1 - sigma) x0 + sigma eps: the forward (noising) process."""
    return (1 - sigma) * x0 + sigma * eps


def x0_from_v(x_t, v, sigma):
    """The transformer predicts v = eps - x0, so x0 = x_sigma - sigma v."""
    return x_t - sigma * v


def classifier_free_guidance(v_uncond, v_cond, g: float):
    """CFG uncond + g (cond - uncond) (diffusers), written as the official cond + (g - 1)(cond - uncond): g = 1 gives cond exactly."""
    return v_cond + (g - 1) * (v_cond - v_uncond)


def student_sigmas(steps: int, shift: float) -> torch.Tensor:
    """The student's sigmas: a uniform grid 1 .. 1/steps, shifted; 8 steps give the official denoising_step_list 1.0 ... 0.3."""
    return shift_sigma(torch.linspace(1.0, 1.0 / steps, steps), shift)  # (steps,)


def draw_sigma(gen: torch.Generator, t_min: float, shift: float):
    """t ~ U[t_min, 1000) on the timestep scale and its sigma, shifted as the student's sampler is: (t, sigma)."""
    t = t_min + (1000.0 - t_min) * torch.rand((), generator=gen, device=gen.device)
    return t, shift_sigma(t / 1000.0, shift)


def flow_matching_loss(v, x0, eps):
    """Rectified-flow regression of the velocity onto eps - x0 (used by the critic and TA-FM)."""
    return F.mse_loss(v.float(), (eps - x0).float())


def student_scheduler(cfg: Config):
    """The stock scheduler equal to the student's sampler (x0, then fresh noise; static shift): 8 steps visit student_sigmas(8, 3), 0."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift, use_dynamic_shifting=False, stochastic_sampling=True)


# ---- Model family: Qwen-Image-Edit (the only family-specific section) ----
# All the algorithm needs from a model family: load, encode (prompt, source image) once, predict v, decode. Another: swap these.

@dataclasses.dataclass
class EditInputs:
    """Everything the transformer needs besides x_t, for one (prompt, source image) pair."""
    embeds: torch.Tensor              # (1, T, D) text-encoder states of prompt + condition image
    mask: torch.Tensor | None         # (1, T) or None when no padding
    image_latents: torch.Tensor       # (1, L, 4C) packed VAE latents of the source image
    img_shapes: list                  # [[(1, h, w) of the output, (1, h, w) of the source]] in patches

    def to(self, device):
        return dataclasses.replace(self, **{k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)})  # mask may be None


class ImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor, which would need torchvision (we only edit images)."""
    def __init__(self, image_processor, tokenizer):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)


STOCK_PROCESSOR = ("transformers", "Qwen2VLProcessor")  # model_index.json entry: a saved pipeline keeps the hub layout


def load_pipeline(base: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The base pipeline: 'tiny' (random, built in code), or a hub id / folder laid out as Qwen/Qwen-Image-Edit-2509, image-only."""
    if base == "tiny":  # the random CPU test model, built in code by examples/make_tiny_teachers.py (tests, smoke test)
        if (examples := str(Path(__file__).resolve().parent / "examples")) not in sys.path:
            sys.path.append(examples)
        pipe = importlib.import_module("make_tiny_teachers").build_tiny_pipeline(seed).to(device)
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)  # fp32 as built; diffusers warns on any cast
    if Path(base).exists() and not (Path(base) / "model_index.json").is_file():
        raise InputError(f"--base '{base}' is not a diffusers pipeline folder (no model_index.json) -- pass the "
                         f"folder `hf download Qwen/Qwen-Image-Edit-2509 --local-dir <folder>` writes, or a hub id")
    try:
        tokenizer = Qwen2Tokenizer.from_pretrained(base, subfolder="tokenizer", local_files_only=HF_HUB_OFFLINE)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(base, subfolder="processor", local_files_only=HF_HUB_OFFLINE)
        pipe = QwenImageEditPlusPipeline.from_pretrained(base, tokenizer=tokenizer, dtype=dtype, local_files_only=HF_HUB_OFFLINE,
                                                         processor=ImageOnlyProcessor(image_processor, tokenizer)).to(device)
    except (OSError, ValueError) as e:  # not cached and no network, or not a valid repo id
        raise InputError(f"--base '{base}' could not be loaded: {str(e).splitlines()[0].split('. ')[0][:200]} -- download it first "
                         f"with `hf download {base}` where there is internet, or pass a local folder") from e
    pipe.register_to_config(processor=STOCK_PROCESSOR)
    return pipe


def tiny_image_sizes(condition: int = 64 * 64, vae: int = 64 * 64):
    """A context: the stock pipeline's module-global resize areas (384^2 condition, 1024^2 VAE image; 0 = as is) set, then restored."""
    return unittest.mock.patch.multiple(qwen, CONDITION_IMAGE_SIZE=condition or qwen.CONDITION_IMAGE_SIZE,
                                        VAE_IMAGE_SIZE=vae or qwen.VAE_IMAGE_SIZE)


def image_sizes(cfg: Config):
    """This run's image areas: --condition_size / --image_size; when 0, 64 for --base tiny, else left as they are."""
    tiny = 64 if cfg.base == "tiny" else 0
    return tiny_image_sizes((cfg.condition_size or tiny) ** 2, (cfg.image_size or tiny) ** 2)


def _qwen_sizes(image):
    """Condition-image and VAE-image sizes (w, h) exactly as QwenImageEditPlusPipeline computes them."""
    ratio = image.size[0] / image.size[1]
    return qwen.calculate_dimensions(qwen.CONDITION_IMAGE_SIZE, ratio), qwen.calculate_dimensions(qwen.VAE_IMAGE_SIZE, ratio)


@torch.no_grad()
def encode(pipe, image, prompt: str) -> EditInputs:
    """Encode (prompt, source image) with the pipeline's own text encoder and VAE, resized as `pipe(...)` does at inference."""
    (cw, ch), (vw, vh) = _qwen_sizes(image)
    device, channels, f = pipe.transformer.device, pipe.transformer.config.in_channels // 4, pipe.vae_scale_factor * 2
    embeds, mask = pipe.encode_prompt(prompt=[prompt], image=[pipe.image_processor.resize(image, ch, cw)], device=device)
    vae_image = pipe.image_processor.preprocess(image, vh, vw).unsqueeze(2)  # (1, 3, 1, H, W)
    _, image_latents = pipe.prepare_latents([vae_image], 1, channels, vh, vw, pipe.transformer.dtype, device, None)
    return EditInputs(embeds, mask, image_latents, [[(1, vh // f, vw // f), (1, vh // f, vw // f)]])  # out = source size


def predict_v(transformer, x_t, sigma, c: EditInputs):
    """v = transformer(x_sigma | source latents, prompt, sigma): the source's tokens are appended (in-context), x_t's part returned."""
    dtype = transformer.img_in.weight.dtype  # the base's dtype (bf16 on CUDA); x_t itself stays fp32
    x_in = torch.cat([x_t, c.image_latents], dim=1).to(dtype)  # (1, 2L, 4C)
    timestep = sigma.reshape(1).to(dtype).expand(x_t.shape[0])  # the model takes t/1000 = sigma
    return transformer(hidden_states=x_in, timestep=timestep, encoder_hidden_states=c.embeds.to(dtype), img_shapes=c.img_shapes,
                       encoder_hidden_states_mask=c.mask, return_dict=False)[0][:, : x_t.shape[1]].float()  # (1, L, 4C)


@torch.no_grad()
def decode(pipe, latents, width: int, height: int):
    """Packed latents (1, L, 4C) -> a PIL image, exactly as the stock pipeline decodes its output."""
    x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.device, pipe.vae.dtype)  # (1,C,1,h,w)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, -1, 1, 1, 1).to(x)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, -1, 1, 1, 1).to(x)
    return pipe.image_processor.postprocess(pipe.vae.decode(x / inv_std + mean, return_dict=False)[0][:, :, 0])[0]


@torch.no_grad()
def sample(pipe, image, prompt: str, steps: int = 8, seed: int | list = 0, output_type: str = "pil", guidance: float = 1.0):
    """The stock pipeline: student in few steps without CFG, teacher with CFG g (empty negative); scheduler noise: a forked, seeded RNG.
    A list of seeds: one output per seed from one batched call (each the same draw as its own call, to rounding)."""
    (_, (vw, vh)), device, seeds = _qwen_sizes(image), pipe.transformer.device, seed if isinstance(seed, list) else [seed]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seeds[0])
        return pipe(image=image, prompt=prompt, negative_prompt="" if guidance > 1 else None, true_cfg_scale=guidance,
                    height=vh, width=vw, num_inference_steps=steps, num_images_per_prompt=len(seeds),
                    generator=[torch.Generator(device).manual_seed(s) for s in seeds], output_type=output_type).images


# ---- Adapters on one shared base: student, critic and the teacher slot ----

def use_adapter(transformer, name: str | None):
    """Route the shared base through one adapter (peft: only its parameters require grad); None = the bare base (general teacher).
    A switch that changes nothing is skipped: each one walks every LoRA layer (a quarter of a toy step's time went to them)."""
    layer = next(m for m in transformer.modules() if isinstance(m, BaseTunerLayer))  # every LoRA layer is in this one's state
    if name is None:
        return None if layer.disable_adapters else transformer.disable_adapters()
    if layer.disable_adapters:
        transformer.enable_adapters()
    if layer.active_adapters != [name]:
        transformer.set_adapter(name)


def adapter_params(transformer, name: str) -> list:
    return [p for n, p in transformer.named_parameters() if f".{name}." in n]


def add_trainable_adapters(transformer, cfg: Config):
    """Student and critic LoRAs on the one base, zero at step 0 (student = critic = base); --init: the exported student, critic = it."""
    torch.manual_seed(cfg.seed)  # LoRA A is drawn from the global RNG: whatever ran before must not matter
    for name in ("student", "critic"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters is the point
            transformer.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                                               init_lora_weights=True), adapter_name=name)
        for p in adapter_params(transformer, name):
            p.data = p.data.float()  # important! trainable LoRA weights stay fp32 under bf16 autocast
    if cfg.init:
        sd = load_file(str(Path(cfg.init) / "pytorch_lora_weights.safetensors"))
        for name in ("student", "critic"):  # the fake score starts as the student's own model
            set_peft_model_state_dict(transformer, {k.removeprefix("transformer."): v for k, v in sd.items()}, adapter_name=name)


# ---- Reading the user's folders: everything is checked before anything is written ----

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclasses.dataclass
class Effect:
    name: str
    instruction: str           # the teacher's own prompt (AOP: the teacher sees this)
    lora_file: Path
    images: list               # source images for this effect (may be empty -> general pool)
    trigger: str = ""          # unique token string; chosen automatically when empty
    student_prompt: str = ""   # trigger + instruction unless given
    weight: float = 1.0        # LoRA strength the teacher was meant to be used at
    sources: list = dataclasses.field(default_factory=list)  # sources/: images with no teacher output, trained on-policy alone


def list_images(*folders: Path, batch_size: int = 1) -> list:
    """The images in the folders, each checked to decode (else an InputError naming it) and, for batch_size > 1, to share one size."""
    images = sorted(p for folder in folders if folder.is_dir() for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    sizes = {}
    for p in images:
        try:
            with Image.open(p) as im:
                im.load()
                sizes[p] = im.size
        except Exception as e:  # zero-size, truncated, not an image, no permission ...
            raise InputError(f"image {p} cannot be read ({type(e).__name__}: {e}) -- replace or delete it") from e
    if batch_size > 1 and (odd := [p for p in images if sizes[p] != sizes[images[0]]]):
        raise InputError(f"--batch_size {batch_size} needs one image size per folder (an effect's images/ and sources/ as one): "
                         f"{images[0]} is {sizes[images[0]]} but {odd[0]} is {sizes[odd[0]]} -- resize them or pass --batch_size 1")
    return images


def read_teachers(folder, batch_size: int = 1) -> list:
    """--teachers: <folder>/<effect>/{*.safetensors, images/, sources/, effect.json: "instruction" [, "trigger", "student_prompt", "weight"]}."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--teachers '{folder}' is not a folder -- pass a folder with one sub-folder per effect")
    if (folder / "effect.json").is_file() or any(folder.glob("*.safetensors")):
        raise InputError(f"--teachers '{folder}' looks like ONE effect -- pass its parent folder (one sub-folder per effect)")
    effects = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        loras, meta_file = sorted(sub.glob("*.safetensors")), sub / "effect.json"
        if len(loras) != 1:
            raise InputError(f"'{sub}' must hold exactly one *.safetensors LoRA file, found {len(loras)} -- keep one "
                             f"(.bin/.pt/.ckpt files are never read: they can execute code; convert them)")
        if not meta_file.is_file():
            raise InputError(f"'{sub}' has no effect.json -- add one with {{\"instruction\": \"...\"}}")
        try:
            meta = json.loads(meta_file.read_text())
            meta = {**meta, "weight": float(meta.get("weight", 1.0))}  # not a dict / weight not a number: error
        except (ValueError, TypeError, AttributeError) as e:
            raise InputError(f"{meta_file} is not valid ({e}) -- it must be a JSON object like "
                             f"{{\"instruction\": \"...\", \"weight\": 1.0}}") from e
        if not meta.get("instruction"):
            raise InputError(f"{meta_file} has no 'instruction' -- add the prompt this LoRA was trained with")
        both = list_images(sub / "images", sub / "sources", batch_size=batch_size)  # sources/: no teacher output (README)
        images, sources = ([p for p in both if p.parent.name == f] for f in ("images", "sources"))
        if (sub / "images").is_dir() and not images:
            raise InputError(f"'{sub / 'images'}' holds no images ({', '.join(IMAGE_EXTS)}) -- add some or remove it")
        e = Effect(sub.name, meta["instruction"], loras[0], images, meta.get("trigger", ""), meta.get("student_prompt", ""),
                   meta["weight"], sources)
        if twin := next((o for o in effects if e.trigger and o.trigger == e.trigger), None):  # empty: chosen later
            raise InputError(f"effects '{twin.name}' and '{e.name}' share the trigger '{e.trigger}' -- make it unique in one effect.json")
        effects.append(e)
    if not effects:
        raise InputError(f"--teachers '{folder}' has no effect sub-folders -- see README 'The teachers folder'")
    return effects


def read_init(cfg: Config, effects: list) -> tuple:
    """--init and --replay, checked against this run: (the --init collection's effects, the replayed ones with their prompts)."""
    folder, mine = Path(cfg.init), dataclasses.asdict(cfg) | {"target_modules": list(cfg.target_modules)}
    try:
        meta = json.loads((folder / "collectionlora.json").read_text())
        theirs = {"base": meta["base"]} | {k: meta["config"][k] for k in ("rank", "alpha", "target_modules")}
        old = {e["name"]: e | {"added_by": e.get("added_by", meta["config"]["out"])} for e in meta["effects"]}
        safe_open(str(folder / "pytorch_lora_weights.safetensors"), "pt").keys()  # missing or not safetensors: refused
    except Exception as e:  # missing, not JSON, not ours
        raise InputError(f"--init '{folder}' is not a collectionlora export ({type(e).__name__}: {str(e)[:80]}) -- pass "
                         f"the lora/ folder of a finished run") from e
    for k in (k for k in theirs if theirs[k] != mine[k]):
        raise InputError(f"--init '{folder}' was made with --{k} {theirs[k]}, this run has {mine[k]} -- pass the same")
    replayed = read_teachers(cfg.replay, cfg.batch_size) if cfg.replay else []
    for e in replayed:
        if e.name not in old:
            raise InputError(f"--replay effect '{e.name}' is not in the --init collection ({', '.join(old)}) -- "
                             f"replay only its effects; a new effect goes in --teachers")
        e.trigger, e.student_prompt = old[e.name]["trigger"], old[e.name]["student_prompt"]
    for e, o in ((e, o) for e in effects for o in old.values()):
        if e.name == o["name"] or e.trigger and e.trigger == o["trigger"] or e.student_prompt == o["student_prompt"]:
            raise InputError(f"new effect '{e.name}' collides with '{o['name']}' of --init (its name, trigger or "
                             f"student prompt) -- rename its folder or change its effect.json")
    return list(old.values()), replayed


def read_inputs(cfg: Config):
    """--out, --teachers, --general, --init, --replay, checked before anything is written: (effects, general edits, --init's effects)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out '{out}' is a file -- pass a folder name")
    previous = any((out / "checkpoints").glob("step_*.pt"))
    if (previous or (out / "lora").exists()) and not (cfg.resume or cfg.overwrite):
        raise InputError(f"--out '{out}' holds a previous run -- pass --resume to continue it, --overwrite to "
                         f"start afresh, or another --out")
    if cfg.resume and not previous:
        raise InputError(f"--resume: no checkpoint in '{out / 'checkpoints'}' -- run once without --resume first")
    effects, general = read_teachers(cfg.teachers, cfg.batch_size), []
    old, replayed = read_init(cfg, effects) if cfg.init else ([], [])
    effects = replayed + effects
    if cfg.general:
        folder = Path(cfg.general)
        if not folder.is_dir():
            raise InputError(f"--general '{folder}' is not a folder -- pass a folder of images with .txt instructions")
        general = [(p, p.with_suffix(".txt").read_text().strip())
                   for p in list_images(folder, batch_size=cfg.batch_size) if p.with_suffix(".txt").is_file()]
        if not general:
            raise InputError(f"--general '{folder}' has no image with a same-name .txt instruction")
    for e in (e for e in effects if not e.images and not general):
        raise InputError(f"effect '{e.name}' has no images/ folder and there is no --general folder "
                         f"to borrow source images from -- add one of them")
    return effects, general, old


def read_lora(lora_file: Path, pipeline_cls, transformer) -> dict:
    """Any LoRA format the pipeline's `lora_state_dict` converts, checked against the base: {module}.A (r, in), .B (out, r) * alpha/r."""
    try:  # use_safetensors: never unpickle a LoRA
        sd, metadata = pipeline_cls.lora_state_dict(str(lora_file), use_safetensors=True, return_lora_metadata=True)
    except Exception as e:  # not safetensors, truncated, or a layout diffusers cannot convert
        raise InputError(f"{lora_file} is not a readable safetensors LoRA ({type(e).__name__}: "
                         f"{str(e)[:100]}) -- re-download or re-export it") from e
    config = {k.removeprefix("transformer."): v for k, v in (metadata or {}).items()}  # peft LoraConfig fields
    modules, out = dict(transformer.named_modules()), {}
    names = {k: k.split(".lora_A.")[0].removeprefix("transformer.").removeprefix("base_model.model.") for k in sd if ".lora_A." in k}
    if unmatched := [k for k, module in names.items() if module not in modules]:
        raise InputError(f"{lora_file}: {len(unmatched)} of its LoRA layers are not in the base transformer (e.g. "
                         f"{', '.join(unmatched[:3])}) -- is this LoRA made for another base model?")
    if not names:
        raise InputError(f"{lora_file} holds no LoRA weights (lora_A/lora_B, lora_down/lora_up) -- is it a LoRA?")
    for key, module in names.items():
        A, B, W = sd[key], sd.get(key.replace(".lora_A.", ".lora_B."), torch.empty(0, 0)), modules[module].weight
        if B.shape[1] != A.shape[0] or (B.shape[0], A.shape[1]) != W.shape[:2]:  # (a missing B is 0 x 0)
            raise InputError(f"{lora_file}: '{module}' has LoRA shapes {tuple(B.shape)} x {tuple(A.shape)}, the base "
                             f"needs ({W.shape[0]}, r) x (r, {W.shape[1]}) -- is this LoRA for another model size?")
        # alpha: diffusers files carry it in their peft config, lora_state_dict folds kohya/ComfyUI's in; neither: alpha = rank
        rank, alpha = A.shape[0], config.get("lora_alpha", A.shape[0])
        for pattern, a in (config.get("alpha_pattern") or {}).items():
            alpha = a if module == pattern or module.endswith("." + pattern) else alpha
        out[f"{module}.A"], out[f"{module}.B"] = A.float().contiguous(), (B.float() * (alpha / rank)).contiguous()
        if not (out[f"{module}.A"].isfinite().all() and out[f"{module}.B"].isfinite().all()):
            raise InputError(f"{lora_file}: '{module}' holds NaN/inf weights -- the file is broken, re-export it")
    return out


# ---- Teacher bank: the --teachers LoRAs, normalised, memory-mapped, swapped into one slot ----

def file_hash(path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def base_tag(pipe) -> str:
    """The base in every cache key, not --base's name (a base changed in place or --base tiny with another --seed computes afresh)."""
    if not hasattr(pipe, "_collectionlora_tag"):  # once: before the encoders may leave and FSDP2 shards the transformer
        named = [(n.replace(".base_layer", ""), p) for m in (pipe.text_encoder, pipe.vae, pipe.transformer)
                 for n, p in m.named_parameters() if "lora_" not in n]  # the base's own weights, whatever adapters it carries
        sample = torch.cat([p.detach().flatten()[:: max(1, p.numel() // 64)][:64].float() for _, p in named]).cpu().numpy()
        pipe._collectionlora_tag = hashlib.sha256(repr([(n, p.shape) for n, p in named]).encode() + sample.tobytes()).hexdigest()[:16]
    return pipe._collectionlora_tag


def nbytes(obj) -> int:  # the tensor bytes in a nested dict / list: about what torch.save writes
    return obj.nbytes if torch.is_tensor(obj) else sum(map(nbytes, obj.values() if isinstance(obj, dict) else obj)) \
        if isinstance(obj, (dict, list, tuple)) else 0


@contextlib.contextmanager
def writing(tmp: Path, need: int):
    """Around a write to `tmp` (file or folder): if it fails, `tmp` goes, and a full disk (quota, size limit; torch.save) is one line."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or "unexpected pos" in str(e) or "write failed" in str(e):
            raise Stopped(f"disk full: writing {tmp.name.split('.')[0]} to '{tmp.parent}' needs about {need / 2**20:.1f} MiB, "
                          f"{shutil.disk_usage(tmp.parent).free / 2**20:.1f} MiB are free -- make room or pass another --out "
                          f"(--cache_dir), then rerun the same command (with --resume once a checkpoint exists)", 1) from e
        raise


def atomic_save(obj, path: Path, save=torch.save) -> None:
    """save(obj, temporary name), then rename: a crash never leaves a half-written file, nor does a full disk (writing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: ranks may write one cache entry at the same time
    with writing(tmp, nbytes(obj)):
        save(obj, tmp)
        os.replace(tmp, path)


class TeacherBank:
    """All teachers memory-mapped on the CPU (RAM does not grow with N); ONE `teacher` slot on the base (GPU: 1x base), rank R = max
    rank, scale 1. Swapping in a rank-r teacher is exact: A -> first r rows of A_slot, scale*B -> first r columns of B_slot, zeros."""
    def __init__(self, effects: list, pipe, cache: Path):
        self.effects, self.active = effects, None
        self.hashes = [file_hash(e.lora_file) for e in effects]  # content hashes: a changed file is a new teacher
        self.files = [cache / "loras" / f"{h}-{base_tag(pipe)}.safetensors" for h in self.hashes]
        new = [(e, f) for e, f in zip(effects, self.files) if not f.exists()]
        for e, _ in new:  # check every new file before writing any: a bad teacher leaves nothing behind
            read_lora(e.lora_file, type(pipe), pipe.transformer)
        for e, f in new:
            atomic_save(read_lora(e.lora_file, type(pipe), pipe.transformer), f, lambda sd, tmp: save_file(sd, str(tmp)))
        shapes = {}  # module -> max rank
        for f in self.files:
            with safe_open(str(f), framework="pt") as sf:
                for k in (k for k in sf.keys() if k.endswith(".A")):
                    shapes[k[:-2]] = max(shapes.get(k[:-2], 0), sf.get_slice(k).get_shape()[0])
        self.rank = max(shapes.values())
        pipe.transformer.add_adapter(LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=sorted(shapes),
                                                init_lora_weights=False), adapter_name="teacher")
        self.slot = {n: m for n, m in pipe.transformer.named_modules() if n in shapes}
        for p in adapter_params(pipe.transformer, "teacher"):
            p.requires_grad_(False)

    @torch.no_grad()
    def swap(self, index: int) -> None:
        """Copy teacher `index` into the slot (rank-padded, see class docstring)."""
        if self.active == index:
            return
        with safe_open(str(self.files[index]), framework="pt") as sf:
            keys = set(sf.keys())
            for name, module in self.slot.items():
                A_slot, B_slot = module.lora_A["teacher"].weight.zero_(), module.lora_B["teacher"].weight.zero_()
                if f"{name}.A" in keys:  # shapes were checked against the base by read_lora
                    A, B = sf.get_tensor(f"{name}.A"), sf.get_tensor(f"{name}.B")
                    A_slot[: A.shape[0]] = A.to(A_slot)
                    B_slot[:, : B.shape[1]] = (B * self.effects[index].weight).to(B_slot)
        self.active = index


# ---- Router: Probabilistic Dual-Stream Routing (PDSR) ----

Route = collections.namedtuple("Route", "stream effect sources targets", defaults=(True,))  # targets False: images + sources/, DMD alone


class Router:
    """Each period of `route_every` steps: w.p. p_switch an effect (its LoRA the teacher; a replay_p share from the n_old replayed, listed
    first), else general (teacher = base); batch_size sources a step; all from (seed, step); torchrun: one stream, each rank its draws."""
    def __init__(self, n_effects: int, pool_sizes: list, n_general: int, p_switch: float, route_every: int, seed: int,
                 batch_size: int = 1, n_old: int = 0, replay_p: float = 0.0, rank: int = 0, on_policy: list = (), warmup: int = 0):
        self.n_effects, self.pool_sizes, self.n_general, self.batch_size = n_effects, pool_sizes, n_general, batch_size
        self.p_switch, self.route_every, self.seed, self.n_old, self.replay_p = p_switch, route_every, seed, n_old, replay_p
        self.rank, self.on_policy, self.warmup = f"/rank{rank}" if rank else "", on_policy, warmup  # rank 0: one process's draws

    def route(self, step: int) -> Route:
        stream = random.Random(f"{self.seed}/period/{step // self.route_every}")
        effect_stream = self.n_general == 0 or stream.random() < self.p_switch
        period = random.Random(f"{self.seed}/period/{step // self.route_every}{self.rank}") if self.rank else stream
        effect = -1 if not effect_stream else period.randrange(self.n_effects) if not self.n_old else (
            period.randrange(self.n_old) if period.random() < self.replay_p else self.n_old + period.randrange(self.n_effects - self.n_old))
        # sources/ (on_policy: pool sizes): after the warm start, a coin shared by the ranks sends half the effect steps there (DMD alone)
        targets = not (effect_stream and self.on_policy and step >= self.warmup and random.Random(f"{self.seed}/on/{step}").random() < 0.5)
        pool = self.n_general if not effect_stream else self.pool_sizes[effect] if targets else self.on_policy[effect]
        draw = random.Random(f"{self.seed}/step/{step}{self.rank}")
        return Route("effect" if effect_stream else "general", effect, tuple(draw.randrange(pool) for _ in range(self.batch_size)), targets)


# ---- Prompts: Asymmetric Orthogonal Prompting (AOP) ----

@torch.no_grad()
def prompt_embedding(pipe, prompt: str) -> torch.Tensor:
    """The text encoder's states for a prompt (no image), averaged over its tokens: (D,)."""
    embeds, mask = pipe.encode_prompt(prompt=[prompt], image=None, device=pipe.text_encoder.device)
    keep = torch.ones(embeds.shape[:2], device=embeds.device) if mask is None else mask.float()
    return (embeds.float() * keep[..., None]).sum(1)[0] / keep.sum()


def max_pairwise_cosine(vectors: torch.Tensor) -> float:
    v = F.normalize(vectors.float(), dim=-1)
    return ((v @ v.T) - 2 * torch.eye(len(v))).max().item() if len(v) > 1 else 0.0


def choose_triggers(pipe, effects: list, seed: int, candidates: int = 16, aop: bool = True, others: list = ()) -> dict:
    """Give each effect without a trigger the candidate that minimises the largest cosine to the prompts chosen so far and to
    `others` (an --init student's). Returns the naive (first) and chosen largest pairwise cosines. aop False: the "w/o AOP" ablation."""
    rng, naive, chosen = random.Random(f"{seed}/triggers"), [], []

    def random_trigger(name: str) -> str:  # paper-style unique token string, e.g. <0417_sepia_Kq3951>
        letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz") for _ in range(2))
        return f"<{rng.randrange(10000):04d}_{name}_{letters}{rng.randrange(10000):04d}>"
    empty = prompt_embedding(pipe, "")  # subtracted, so the shared chat template does not dominate the cosine
    known = [prompt_embedding(pipe, p) - empty for p in others]
    for e in effects:
        if not aop:  # an ablation: the effect.json's trigger and student_prompt are ignored too
            e.trigger, e.student_prompt = "", e.instruction
        pool = [e.trigger] if e.trigger or e.student_prompt else [random_trigger(e.name) for _ in range(candidates)]  # effect.json
        embs = [prompt_embedding(pipe, e.student_prompt or f"{t} {e.instruction}") - empty for t in pool]
        worst = [max([max_pairwise_cosine(torch.stack(chosen + [x]))] + [F.cosine_similarity(x, k, 0).item() for k in known]) for x in embs]
        best = min(range(len(pool)), key=worst.__getitem__)  # the first one while nothing is chosen
        e.trigger, naive, chosen = pool[best], naive + [embs[0]], chosen + [embs[best]]
    for e in effects:  # earlier effects are filled in; a later one is empty or set by its effect.json
        e.student_prompt = e.student_prompt or f"{e.trigger} {e.instruction}"
        if aop and ((twin := next(o for o in effects if o.student_prompt == e.student_prompt)) is not e or e.student_prompt in others):
            raise InputError(f"effects '{twin.name if twin is not e else 'of --init'}' and '{e.name}' have the same "
                             f"student prompt '{e.student_prompt}' -- give one of them its own trigger or student_prompt")
    if shared := sum(n for n in collections.Counter(e.student_prompt for e in effects).values() if n > 1):  # the ablation's point
        print(f"warning: --no-aop: {shared} of {len(effects)} effects share their student prompt with another effect")
    return {"naive_max_cos": max_pairwise_cosine(torch.stack(naive)), "chosen_max_cos": max_pairwise_cosine(torch.stack(chosen))}


# ---- Data: every (prompt, image) encoded once, every teacher target ("base_pred") computed once ----

def teacher_target(pipe, bank: TeacherBank, index: int, image_path: Path, cfg: Config, teacher_scheduler, general: str = "") -> list:
    """The --targets_per_image teacher outputs (latents, each (1, L, 4C)) for (effect, source image), or (index -1) the bare base's
    one for a general edit (its instruction `general`): the stock pipeline with the teacher's LoRA, the base's scheduler, CFG g; cached.
    A source's missing outputs come from one batched call: on the toy bench 8 in 0.42 s, one by one 1.9 s."""
    e, image = bank.effects[index] if index >= 0 else None, Image.open(image_path).convert("RGB")
    (_, (vw, vh)), text, h = _qwen_sizes(image), e.instruction if e else general, file_hash(image_path)  # the file read once
    seeds = [cfg.seed + int(hashlib.sha256((h + text + (f"/{k}" if k else "")).encode()).hexdigest()[:15], 16)
             for k in range(cfg.targets_per_image if e else 1)]
    key = lambda s: [base_tag(pipe), bank.hashes[index] if e else "base", s, vw, vh, e.weight if e else 1.0, cfg.teacher_steps, cfg.guidance]
    paths = [cfg.cache / "targets" / f"{hashlib.sha256(json.dumps(key(s)).encode()).hexdigest()[:24]}.pt" for s in seeds]  # all it depends on
    if missing := [k for k, path in enumerate(paths) if not path.exists()]:
        if e:
            bank.swap(index)
        use_adapter(pipe.transformer, "teacher" if e else None)
        with unittest.mock.patch.object(pipe, "scheduler", teacher_scheduler):  # set for this call, then the student's again
            # important! each (source, instruction, j) its own noise: with one seed for all, most targets of a multi-modal effect were one mode
            y = sample(pipe, image, text, cfg.teacher_steps, [seeds[k] for k in missing], "latent", cfg.guidance).float().cpu()
        for k, y_k in zip(missing, y):  # (L, 4C) each
            atomic_save(y_k[None].clone(), paths[k])
    return [torch.load(path, weights_only=True) for path in paths]


def cached_encode(pipe, image_path: Path, prompt: str, cfg: Config) -> EditInputs:
    """encode(), cached on disk, read back memory-mapped: the encoders run once per input across runs, RAM does not grow with data."""
    image = Image.open(image_path).convert("RGB")
    key = hashlib.sha256(json.dumps([base_tag(pipe), file_hash(image_path), prompt, _qwen_sizes(image)]).encode()).hexdigest()[:24]
    path = cfg.cache / "inputs" / f"{key}.pt"
    if not path.exists():
        c = encode(pipe, image, prompt)
        atomic_save({"embeds": c.embeds.cpu(), "image_latents": c.image_latents.cpu(), "img_shapes": c.img_shapes}
                    | ({} if c.mask is None else {"mask": c.mask.cpu()}), path)
    d = torch.load(path, mmap=True, weights_only=True)
    return EditInputs(d["embeds"], d.get("mask"), d["image_latents"], d["img_shapes"])


@dataclasses.dataclass
class Batch:
    student: EditInputs             # AOP: the student's (and critic's) prompt
    teacher: EditInputs             # AOP: the teacher's own instruction
    negative: EditInputs            # empty prompt: the unconditional branch of CFG
    teacher_adapter: str | None     # "teacher" on the effect stream, None (bare base) on the general stream
    target: torch.Tensor | None     # (B, L, 4C) teacher output y; none on sources/; on the general stream (the base's) only for the warm start


class EditData:
    """Every input and teacher target the run can draw, computed once, cached, memory-mapped: the encoders can leave the GPU early."""
    def __init__(self, pipe, effects: list, general: list, bank: TeacherBank, cfg: Config, teacher_scheduler):
        self.effects, self.pools = effects, [e.images or [p for p, _ in general] for e in effects]  # read_inputs: none is empty
        self.on_policy = [pool + e.sources for pool, e in zip(self.pools, effects)]  # sources/: never a teacher output
        enc, (rank, world) = functools.lru_cache(maxsize=None)(lambda prompt, path: cached_encode(pipe, path, prompt, cfg)), rank_and_world()
        self.effect_inputs = {(i, p): tuple(enc(text, p) for text in (e.student_prompt, e.instruction, ""))  # AOP's three prompts
                              for i, e in enumerate(tqdm(effects, desc="encoding", disable=rank > 0)) for p in self.on_policy[i]}
        self.targets, items = {}, [(i, p) for i, pool in enumerate(self.pools) for p in pool]  # router index s: source s % n, target s // n
        for i, p in items[rank::world] if world > 1 else ():  # torchrun: each rank first fills its share of the cache
            teacher_target(pipe, bank, i, p, cfg, teacher_scheduler)
        gather(None)  # torchrun: a barrier, the shares are all written
        for i, p in tqdm(items, desc="teacher targets", disable=rank > 0):
            self.targets |= {(i, p, j): y for j, y in enumerate(teacher_target(pipe, bank, i, p, cfg, teacher_scheduler))}
        self.general_inputs = [(enc(instruction, image), enc("", image)) for image, instruction in general]
        # the warm start's flow matching on the general stream learns the base's own edits (else it unlearns them: examples/LAB_NOTES.md)
        self.general_targets = [teacher_target(pipe, bank, -1, image, cfg, teacher_scheduler, general=instruction)[0]
                                for image, instruction in tqdm(general, desc="general targets", disable=rank > 0)] if cfg.warmup else []

    def batch(self, r: Route, device) -> Batch:
        if r.stream == "effect":
            pool = self.pools[r.effect] if r.targets else self.on_policy[r.effect]
            picks = [(pool[s % len(pool)], s // len(pool)) for s in r.sources]  # (source, which of its K targets)
            student, teacher, negative = (stack([self.effect_inputs[r.effect, p][k] for p, _ in picks], device) for k in range(3))
            return Batch(student, teacher, negative, "teacher",
                         torch.cat([self.targets[r.effect, p, j] for p, j in picks]).to(device) if r.targets else None)
        prompt, negative = (stack([self.general_inputs[i][j] for i in r.sources], device) for j in range(2))
        target = torch.cat([self.general_targets[i] for i in r.sources]).to(device) if self.general_targets else None
        return Batch(prompt, prompt, negative, None, target)  # general stream: everyone sees the instruction


def stack(inputs: list, device) -> EditInputs:
    """A batch of EditInputs: text states right-padded to the longest, masked out of the joint attention; one image size."""
    if len(inputs) == 1:
        return inputs[0].to(device)
    T = max(c.embeds.shape[1] for c in inputs)
    mask = [torch.ones(c.embeds.shape[:2], dtype=torch.long) if c.mask is None else c.mask.long() for c in inputs]
    return EditInputs(torch.cat([F.pad(c.embeds, (0, 0, 0, T - c.embeds.shape[1])) for c in inputs]),
                      torch.cat([F.pad(m, (0, T - m.shape[1])) for m in mask]),
                      torch.cat([c.image_latents for c in inputs]), inputs[0].img_shapes * len(inputs)).to(device)


def prepare(pipe, cfg: Config, effects: list, general: list, others: list = ()):
    """Everything before the loop: AOP triggers, the teacher slot, every input encoded, every teacher target computed."""
    pipe.set_progress_bar_config(disable=True)
    teacher_scheduler, pipe.scheduler = pipe.scheduler, student_scheduler(cfg)  # the teachers sample with the base's own
    aop = choose_triggers(pipe, effects, cfg.seed, aop=cfg.aop, others=others)  # may still refuse: nothing written yet
    return (bank := TeacherBank(effects, pipe, cfg.cache)), EditData(pipe, effects, general, bank, cfg, teacher_scheduler), aop


# ---- Student sampler with backward simulation (DMD2 §4.5) ----

@torch.no_grad()
def backward_simulation(transformer, c: EditInputs, sigmas: torch.Tensor, k: int, gen: torch.Generator):
    """The student's sampler from pure noise for k steps (x0, re-noised with fresh noise): x at sigmas[k], or the sample (k = steps)."""
    x = torch.randn(c.image_latents.shape, generator=gen, device=gen.device)  # (1, L, 4C) at sigma 1: output = source size
    for i in range(k):
        x0 = x0_from_v(x, predict_v(transformer, x, sigmas[i], c), sigmas[i])
        x = add_noise(x0, torch.randn(x0.shape, generator=gen, device=gen.device), sigmas[i + 1]) if i + 1 < len(sigmas) else x0
    return x


def on_policy_x0(transformer, c: EditInputs, sigmas: torch.Tensor, gen: torch.Generator):
    """What DMD is applied to AND the critic learns (official `_run_generator`): backward-simulate to a uniform step k, one x0 step."""
    k = gather(int(torch.randint(len(sigmas), (), generator=gen, device=gen.device)))[0]  # torchrun: rank 0's k (--fsdp needs it)
    use_adapter(transformer, "student")
    x_k = backward_simulation(transformer, c, sigmas, k, gen)
    return x0_from_v(x_k, predict_v(transformer, x_k, sigmas[k], c), sigmas[k])  # (B, L, 4C) x0_hat, with grad unless no_grad


# ---- Losses: Coarse-to-Fine Distillation Objective (C2F-DO; L_total in paper §4) ----

def dmd_loss(x0_hat, real_x0, fake_x0):
    """DMD eq. 7, DMD2 normaliser: grad = (fake - real) / mean|x0_hat - real|, as 0.5 MSE to a stop-gradient target: dL/dx0_hat = grad/N."""
    with torch.no_grad():
        normaliser = (x0_hat - real_x0).abs().mean(dim=tuple(range(1, x0_hat.ndim)), keepdim=True)  # (B, 1, 1)
        grad = torch.nan_to_num((fake_x0 - real_x0) / normaliser)
    target = (x0_hat - grad).detach()  # important! a stop-gradient target, or the gradient cancels out
    return 0.5 * F.mse_loss(x0_hat.float(), target.float())


def dmd_term(transformer, x0_hat, b: Batch, sigma, cfg: Config, gen):
    """The DMD loss of x0_hat noised to sigma: real score = teacher + CFG on its own instruction (AOP), fake = critic (no grad)."""
    x_t = add_noise(x0_hat.detach(), torch.randn(x0_hat.shape, generator=gen, device=gen.device), sigma)  # (1, L, 4C)
    with torch.no_grad():
        use_adapter(transformer, b.teacher_adapter)
        v_real = predict_v(transformer, x_t, sigma, b.teacher)
        if cfg.guidance != 1:  # g = 1 needs no unconditional pass
            v_real = classifier_free_guidance(predict_v(transformer, x_t, sigma, b.negative), v_real, cfg.guidance)
        use_adapter(transformer, "critic")
        fake_x0 = x0_from_v(x_t, predict_v(transformer, x_t, sigma, b.student), sigma)
    return dmd_loss(x0_hat, x0_from_v(x_t, v_real, sigma), fake_x0)


def flow_matching_term(transformer, adapter: str, x0, c: EditInputs, t_min, cfg: Config, gen):
    """Flow matching of `adapter` on fixed x0 at shifted t ~ U[t_min, 1000): TA-FM (student, teacher outputs), critic (samples)."""
    sigma, eps = draw_sigma(gen, float(t_min), cfg.shift)[1], torch.randn(x0.shape, generator=gen, device=gen.device)
    use_adapter(transformer, adapter)
    return flow_matching_loss(predict_v(transformer, add_noise(x0, eps, sigma), sigma, c), x0, eps)


def student_loss(transformer, b: Batch, sigmas, cfg: Config, gen) -> dict:
    """L = L_DMD(backward simulation) [+ w_ts L_DMD(target simulation) + w_fm L_TA-FM on the effect stream]."""
    x0_hat = on_policy_x0(transformer, b.student, sigmas, gen)  # DMD on backward simulation
    t_dmd, sigma = draw_sigma(gen, 0.0, cfg.shift)
    losses = {"dmd": dmd_term(transformer, x0_hat, b, sigma, cfg, gen)}
    if b.teacher_adapter and b.target is not None:  # the effect stream with teacher outputs (general, sources/: DMD alone)
        y = b.target  # the teacher's own output for this source (paper: base_pred)
        # target simulation (fine): the student denoises y noised to one of its last k sigmas
        j = int(torch.randint(len(sigmas) - cfg.ts_last_k, len(sigmas), (), generator=gen, device=gen.device))
        x_j = add_noise(y, torch.randn(y.shape, generator=gen, device=gen.device), sigmas[j])
        use_adapter(transformer, "student")
        x0_ts = x0_from_v(x_j, predict_v(transformer, x_j, sigmas[j], b.student), sigmas[j])
        losses["ts"] = dmd_term(transformer, x0_ts, b, draw_sigma(gen, cfg.ts_t_min, cfg.shift)[1], cfg, gen)
        # trajectory-anchored flow matching (coarse): flow matching on y at t in [t_dmd, 1000)
        losses["fm"] = flow_matching_term(transformer, "student", y, b.student, t_dmd, cfg, gen)
    use_adapter(transformer, "student")  # important! backward (and checkpoint recompute) must see the student
    return losses


def critic_loss(transformer, b: Batch, sigmas, cfg: Config, gen):
    """The fake score learns what DMD is applied to: flow matching on fresh on_policy_x0 samples (no grad), student prompt."""
    with torch.no_grad():
        x0 = on_policy_x0(transformer, b.student, sigmas, gen)  # (B, L, 4C)
    return flow_matching_term(transformer, "critic", x0, b.student, 0.0, cfg, gen)


# ---- One training step ----

def apply_update(loss, optimiser, clip: float) -> bool:
    """backward, average over ranks, clip, step; a NaN/inf loss or gradient on any rank changes nothing (it would poison Adam): False."""
    params, finite = optimiser.param_groups[0]["params"], bool(torch.isfinite(loss))
    loss.backward()  # even when not finite (then skipped below): under --fsdp a backward is a collective
    if ok := average_gradients(params, finite) and bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, clip))):
        optimiser.step()
    optimiser.zero_grad(set_to_none=True)  # freed at once, not kept to the next update: 4.7 GB at rank 128 (README "Memory plan")
    return ok


def train_step(step: int, transformer, b: Batch, sigmas, opt_student, opt_critic, cfg: Config, gen, autocast) -> dict:
    """Student every gen_every steps (DMD2), then critic; warm start (step < warmup): student FM on teacher outputs, then critic = it."""
    logs, skipped, warm = {}, [], step < cfg.warmup
    falling = 1 - (step - cfg.warmup) / (cfg.max_steps - cfg.warmup) if cfg.lr_decay and not warm else 1  # deviation 10
    opt_student.param_groups[0]["lr"] = (cfg.warmup_lr or cfg.lr) * (1 - step / cfg.warmup) if warm else cfg.lr * falling
    if step == cfg.warmup > 0:  # the warm start ends: the fake score starts as the student's own model, copied
        set_peft_model_state_dict(transformer, get_peft_model_state_dict(transformer, adapter_name="student"), adapter_name="critic")
    if warm or step % cfg.gen_every == 0:
        with autocast:
            losses = ({"fm": flow_matching_term(transformer, "student", b.target, b.student, 0.0, cfg, gen)} if warm
                      else student_loss(transformer, b, sigmas, cfg, gen))
        weights = {"dmd": 1.0, "ts": cfg.w_ts, "fm": 1.0 if warm else cfg.w_fm}
        if not apply_update(sum(weights[k] * v for k, v in losses.items()), opt_student, cfg.grad_clip):
            skipped.append(f"student ({', '.join(k for k, v in losses.items() if not v.isfinite()) or 'gradient'})")
        logs.update({k: v.item() for k, v in losses.items()})
    if not warm:
        with autocast:
            loss = critic_loss(transformer, b, sigmas, cfg, gen)
        if not apply_update(loss, opt_critic, cfg.grad_clip):
            skipped.append("critic")
        logs["critic"] = loss.item()
    return logs | {"skipped": skipped}


# ---- Many processes (torchrun): each rank the whole model (--fsdp: a shard of it), the period's stream, its own data ----

def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank; [obj] for a single process."""
    objs = [obj] * rank_and_world()[1]
    if dist.is_initialized():
        dist.all_gather_object(objs, obj)
    return objs


def average_gradients(params: list, finite: bool) -> bool:
    """DDP without its wrapper (student and critic share one module): gradients averaged over ranks; a non-finite rank sends NaN."""
    if not dist.is_initialized():
        return finite
    if isinstance(params[0], DTensor):  # --fsdp: the backward averaged them (reduce-scatter); a rank's NaN reaches every norm
        return True
    for p in params:  # a LoRA the graph did not reach gets 0, as DDP's find_unused_parameters
        p.grad = p.grad if finite and p.grad is not None else torch.full_like(p, 0.0 if finite else torch.nan)
        dist.all_reduce(p.grad)
        p.grad /= dist.get_world_size()
    return True


def shard(transformer, dtype) -> None:
    """--fsdp: FSDP2 per block: base, student, critic (so Adam's states) split over the ranks; the teacher slot whole on each (README)."""
    teacher, mixed = set(adapter_params(transformer, "teacher")), MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")  # predict_v slices it, never in place
    for module in [*transformer.transformer_blocks, transformer]:  # fp32 LoRAs gathered in the base's dtype: autocast's anyway
        fully_shard(module, mp_policy=mixed, ignored_params=teacher)


def whole(tree):
    """A (nested) state dict with each --fsdp shard (DTensor) gathered into its full tensor: a collective, every rank calls it."""
    return {k: whole(v) for k, v in tree.items()} if isinstance(tree, dict) else tree.full_tensor() if isinstance(tree, DTensor) else tree


# ---- Train loop, checkpoints, export, preview ----

@contextlib.contextmanager
def deferred_signals():
    """SIGINT/SIGTERM set a flag: the loop finishes its step, checkpoints and stops; a second one stops at once (not under torchrun)."""
    def handler(signum, frame):
        if caught and int(os.environ.get("WORLD_SIZE", 1)) == 1:
            raise KeyboardInterrupt
        caught.append(signum)
    caught, main_thread = [], threading.current_thread() is threading.main_thread()  # Python delivers signals to it only
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def save_checkpoint(folder: Path, step: int, transformer, opt_student, opt_critic, gen, keep: int, logs: dict):
    """All a bit-exact resume needs: LoRAs, optimisers, every rank's RNG (router: from the step), the last student losses; all ranks."""
    gens, names = gather(gen.get_state()), ("student", "critic")
    state = whole({"opt_student": opt_student.state_dict(), "opt_critic": opt_critic.state_dict()}  # --fsdp: the shards gathered
                  | {name: get_peft_model_state_dict(transformer, adapter_name=name) for name in names})
    if rank_and_world()[0] > 0:
        return None
    state |= {"step": step, "gen": gens, "logs": logs} | {name: {k: v.detach().cpu().clone() for k, v in state[name].items()} for name in names}
    atomic_save(state, path := folder / f"step_{step:08d}.pt")
    for old in sorted(folder.glob("step_*.pt"))[:-keep]:
        old.unlink()
    return path


def load_checkpoint(path: Path, transformer, opt_student, opt_critic, gen) -> tuple:
    """Restore a save_checkpoint() file in place; returns (its step, the last student losses)."""
    state, (rank, world) = torch.load(path, weights_only=True, map_location="cpu"), rank_and_world()  # weights only: safe
    if len(gens := state["gen"]) != world:
        raise InputError(f"--resume: {path} was written by {len(gens)} processes, this run has {world} -- resume with the "
                         f"same number of processes (torchrun --nproc_per_node)")
    if rank == 0:
        print(f"resumed from {path} at step {state['step']}")
    def like(value, p):  # a full tensor of the checkpoint as parameter p holds it: under --fsdp, this rank's shard (a DTensor)
        return distribute_tensor(value.to(p.to_local().device), p.device_mesh, p.placements) if isinstance(p, DTensor) else value
    for name, opt in (("student", opt_student), ("critic", opt_critic)):
        params, adam = opt.param_groups[0]["params"], state[f"opt_{name}"]
        named = {n.replace(f".{name}.", "."): p for n, p in transformer.named_parameters() if f".{name}." in n}  # peft's keys
        set_peft_model_state_dict(transformer, {k: like(v, named[k]) for k, v in state[name].items()}, adapter_name=name)
        adam["state"] = {i: {k: like(v, params[i]) if v.dim() else v for k, v in s.items()} for i, s in adam["state"].items()}
        opt.load_state_dict(adam)
    gen.set_state(gens[rank])
    return state["step"], state.get("logs", {})


def export_lora(pipe, cfg: Config, effects: list, bank: TeacherBank, extra: dict, old: list = ()) -> Path:
    """The student for diffusers (pytorch_lora_weights.safetensors + scheduler/) and ComfyUI (<name>_comfyui.safetensors), described
    in collectionlora.json: which file for which tool, the sampler in both tools' terms, every effect's prompt (--init's too)."""
    out, tmp = Path(cfg.out) / "lora", Path(cfg.out) / "lora.tmp"
    sd, config = whole(get_peft_model_state_dict(pipe.transformer, adapter_name="student")), pipe.transformer.peft_config["student"]
    if rank_and_world()[0] > 0:  # every rank gathers the student (--fsdp), rank 0 writes it
        return None
    shutil.rmtree(tmp, ignore_errors=True)
    type(pipe).save_lora_weights(tmp, transformer_lora_layers=sd, transformer_lora_adapter_metadata=config.to_dict())
    student_scheduler(cfg).save_pretrained(tmp / "scheduler")
    # ComfyUI: "diffusion_model.<diffusers' module name>" (model_lora_keys_unet, comfy/lora.py), scaled by ".alpha" / rank (none: 1)
    comfy_file = f"{Path(cfg.out).resolve().name}_comfyui.safetensors"
    comfy = {f"diffusion_model.{k.rsplit('.', 2)[0]}.lora_{'down' if '.lora_A.' in k else 'up'}.weight": v for k, v in sd.items()}
    alphas = {k.replace(".lora_down.weight", ".alpha"): torch.tensor(float(config.lora_alpha)) for k in comfy if "_down." in k}
    save_file({k: v.contiguous() for k, v in comfy.items()} | alphas, str(tmp / comfy_file))  # one alpha: no patterns
    steps, shift, added_by = cfg.student_steps, cfg.shift, {o["name"]: o["added_by"] for o in old}
    entries = [o for o in old if o["name"] not in {e.name for e in effects}] + [
        {"name": e.name, "trigger": e.trigger, "student_prompt": e.student_prompt, "teacher_instruction": e.instruction,
         "teacher_sha256_16": h, "added_by": added_by.get(e.name, cfg.out)} for e, h in zip(effects, bank.hashes)]
    meta = {"base": cfg.base, "paper": "arXiv 2605.25378",
            "files": {"diffusers": "pytorch_lora_weights.safetensors + scheduler/", "comfyui": comfy_file}, "effects": entries,
            "prompts": {e["name"]: e["student_prompt"] for e in entries},
            "sampler": {"num_inference_steps": steps, "true_cfg_scale": 1.0, "scheduler": "scheduler/",
                        "sigmas": [round(s, 6) for s in student_sigmas(steps, shift).tolist()]},
            # ComfyUI's lcm: x0, then sigma' noise + (1 - sigma') x0 (ours); simple on the shifted table: student_sigmas
            "comfyui": {"file": comfy_file, "loader": "LoraLoaderModelOnly", "strength_model": 1.0, "sigmas_exact": 1000 % steps == 0,
                        "model_sampling": {"node": "ModelSamplingAuraFlow", "shift": shift}, "ksampler": {
                            "sampler_name": "lcm", "scheduler": "simple", "steps": steps, "cfg": 1.0, "denoise": 1.0}},
            "versions": {"python": sys.version.split()[0]} | {m: importlib.import_module(m).__version__
                                                             for m in ("torch", "diffusers", "peft", "transformers")},
            "config": dataclasses.asdict(cfg), **extra}
    (tmp / "collectionlora.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


@torch.no_grad()
def distances_to_teachers(transformer, data: EditData, sigmas, adapter: str | None, seeds=(0, 1)) -> list:
    """Per effect, on its first source: latent MSE of the 8-step output to the teacher's; a private RNG leaves training's draws alone."""
    use_adapter(transformer, adapter)
    device, first = sigmas.device, [(data.effect_inputs[i, p[0]][0], data.targets[i, p[0], 0]) for i, p in enumerate(data.pools)]
    return [sum(F.mse_loss(backward_simulation(transformer, c.to(device), sigmas, len(sigmas), torch.Generator(device).manual_seed(s)),
                           y.to(device)).item() for s in seeds) / len(seeds) for c, y in first]


def write_preview(pipe, cfg: Config, data: EditData, name: str = "preview.png", rows: int = 16, gap: int = 2) -> Path:
    """<out>/<name>: a named row per effect (first `rows`) on its first source, enlarged: source | teacher (cached) | student (seed)."""
    home, rows, cells = pipe.text_encoder.device, data.effects[:rows], []  # cells: source | teacher | student per row, enlarged
    use_adapter(pipe.to(pipe.transformer.device).transformer, "student")
    for i, e in enumerate(rows):
        image = Image.open(path := data.pools[i][0]).convert("RGB")
        _, (w, h) = _qwen_sizes(image)
        student, scale = sample(pipe, image, e.student_prompt, cfg.student_steps, cfg.seed, output_type="latent"), max(1, 96 // h)
        cells.append([c.resize((w * scale, h * scale), Image.NEAREST) for c in (
            pipe.image_processor.resize(image, h, w), decode(pipe, data.targets[i, path, 0], w, h), decode(pipe, student, w, h))])
    left, top = 6 * max(len(e.name) for e in rows) + 6, 14  # room for the names and the titles
    grid = Image.new("RGB", (left + max(3 * r[0].width + 2 * gap for r in cells), top + sum(r[0].height + gap for r in cells) - gap), "white")
    draw, y = ImageDraw.Draw(grid), top
    for j, title in enumerate(("source", "teacher", "student")):
        draw.text((left + j * (cells[0][0].width + gap), 1), title, fill="black")
    for e, row in zip(rows, cells):
        draw.text((2, y + row[0].height // 2 - 5), e.name, fill="black")
        for j, cell in enumerate(row):
            grid.paste(cell, (left + j * (cell.width + gap), y))
        y += row[0].height + gap
    pipe.text_encoder.to(home), pipe.vae.to(home)
    if rank_and_world()[0] == 0:
        atomic_save(grid, Path(cfg.out) / name, lambda image, tmp: image.save(tmp, format="PNG"))
    return Path(cfg.out) / name


def device_setup(cfg: Config) -> tuple:
    """(device, base dtype, autocast): bf16 base and autocast on CUDA (the LoRAs stay fp32), fp32 on CPU; torchrun: LOCAL_RANK's GPU."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    bf16 = cfg.dtype == "bf16" or cfg.dtype == "auto" and device.type == "cuda"
    return device, torch.bfloat16 if bf16 else torch.float32, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def train(cfg: Config) -> Path | None:
    """Distil the --teachers folder into one student LoRA; returns the exported LoRA folder (None on torchrun's ranks > 0)."""
    check_config(cfg)
    device, dtype, autocast = device_setup(cfg)
    if cuda := device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    effects, general, old = read_inputs(cfg)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # torchrun: one process per device
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, out = rank_and_world()[0], Path(cfg.out)
    ckpt_dir, log = out / "checkpoints", out / "log.jsonl"

    # --- models: ONE base transformer carries the teacher slot, the student and the critic ---
    pipe = load_pipeline(cfg.base, device, dtype, cfg.seed)  # fp32 on CPU
    transformer = pipe.transformer.requires_grad_(False)
    # known in advance: the checkpoints (both LoRAs and both Adam moments in fp32) and the export (two files of the student)
    need = 4 * cfg.rank * sum(m.in_features + m.out_features for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
                              and any(n == t or n.endswith("." + t) for t in cfg.target_modules)) * (6 * cfg.keep_checkpoints + 8)
    if need > (free := shutil.disk_usage(next(p for p in (out, *out.resolve().parents) if p.exists())).free):
        raise InputError(f"--out '{out}' has {free / 2**20:.0f} MiB free, its checkpoints and export need about "
                         f"{need / 2**20:.0f} MiB -- make room there, lower --keep_checkpoints, or pass another --out")
    with image_sizes(cfg):
        others = [o["student_prompt"] for o in old if o["name"] not in {e.name for e in effects}]
        bank, data, aop = prepare(pipe, cfg, effects, general, others)  # the last step that may refuse the input
    for p in (ckpt_dir, out / "lora", out / "preview.png", log, *out.glob("preview_*.png")) if cfg.overwrite and rank == 0 else ():
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)  # only now: a refused run leaves the previous one
    if rank == 0:
        print(f"AOP: {len(effects)} student prompts; largest pairwise cosine {aop['naive_max_cos']:.3f} with naive triggers -> "
              f"{aop['chosen_max_cos']:.3f} chosen" if cfg.aop else "no AOP (--no-aop): the student prompts are the teacher "
              f"instructions; largest pairwise cosine {aop['chosen_max_cos']:.3f}")
    add_trainable_adapters(transformer, cfg)
    if cuda:  # every input is encoded: the text encoder and VAE can leave the GPU
        pipe.text_encoder.to("cpu"), pipe.vae.to("cpu")
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
    if cfg.fsdp:
        shard(transformer, dtype)
    opt_student, opt_critic = (torch.optim.AdamW(adapter_params(transformer, name), lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
                               for name, lr in (("student", cfg.lr), ("critic", cfg.critic_lr)))
    router = Router(len(effects), [len(p) * cfg.targets_per_image for p in data.pools], len(general), cfg.p_switch, cfg.route_every,
                    cfg.seed, cfg.batch_size, sum(e.name in {o["name"] for o in old} for e in effects), cfg.replay_p, rank,
                    [len(p) for p in data.on_policy] if any(e.sources for e in effects) else [], cfg.warmup)
    gen = torch.Generator(device).manual_seed(cfg.seed + 1_000_003 * rank)  # each rank its own noise
    sigmas = student_sigmas(cfg.student_steps, cfg.shift).to(device)  # (8,) 1.0 ... 0.3
    start, student_logs = load_checkpoint(max(ckpt_dir.glob("step_*.pt")), transformer, opt_student, opt_critic, gen) if cfg.resume else (0, {})
    if rank == 0:  # log.jsonl: one line per logged step; a resumed run drops the lines written after its checkpoint
        kept = [line for line in log.read_text().splitlines() if line.endswith("}") and json.loads(line)["step"] <= start] \
            if log.exists() else []  # a line cut short by a crash ends without its "}"
        atomic_save("".join(line + "\n" for line in kept), log, lambda text, tmp: tmp.write_text(text))

    # --- the loop: critic every step, student every gen_every ---
    t0, nonfinite = time.time(), 0
    with deferred_signals() as signals, tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps,
                                             desc="distilling", dynamic_ncols=True, disable=rank > 0) as bar:
        say = bar.write if rank == 0 else lambda line: None
        for step in bar:
            route = router.route(step)
            if route.stream == "effect":
                bank.swap(route.effect)
            logs = train_step(step, transformer, data.batch(route, device), sigmas, opt_student, opt_critic, cfg, gen, autocast)
            what = effects[route.effect].name if route.stream == "effect" else "general"
            if skipped := logs.pop("skipped"):
                say(f"warning: step {step + 1} ({what}): non-finite loss in {' and '.join(skipped)} -- update skipped")
            nonfinite = nonfinite + 1 if skipped else 0
            student_logs = {k: v for k, v in logs.items() if k != "critic"} or student_logs  # shown: the last student update
            shown = student_logs | {k: v for k, v in logs.items() if k == "critic"}
            bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items()})
            if (step + 1) % cfg.log_every == 0 and rank == 0:
                seconds = (time.time() - t0) / (step + 1 - start)
                say(f"step {step + 1}/{cfg.max_steps} | {what} | " + " ".join(f"{k} {v:.4f}" for k, v in shown.items())
                    + f" | {seconds:.3f} s/step")
                with log.open("a") as f:  # the stream and effect of this step, the losses shown (the student's: its last update)
                    f.write(json.dumps({"step": step + 1, "stream": route.stream, "effect": what} | shown | {"s_step": seconds}) + "\n")
            stop = any(gather(bool(signals)))  # a signal reaches each rank at its own step: all stop after the same one
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.max_steps or stop or nonfinite >= cfg.max_nonfinite:
                path = save_checkpoint(ckpt_dir, step + 1, transformer, opt_student, opt_critic, gen, cfg.keep_checkpoints, student_logs)
            if cfg.preview_every and (step + 1) % cfg.preview_every == 0:  # every rank samples (--fsdp: together), rank 0 writes
                with image_sizes(cfg):
                    write_preview(pipe, cfg, data, f"preview_{step + 1}.png")
            if nonfinite >= cfg.max_nonfinite:
                raise Stopped(f"stopped at step {step + 1}: {nonfinite} steps in a row had a non-finite loss (last: "
                              f"{' and '.join(skipped)} on '{what}') -- checkpoint {path}; lower --lr or check that "
                              f"effect's LoRA, then rerun with --resume", 1)
            if stop:
                sig, resume = (signals or [signal.SIGTERM])[0], "--resume instead of --overwrite" if cfg.overwrite else "--resume"
                raise Stopped(f"{signal.Signals(sig).name}: stopped after step {step + 1}, checkpoint {path} -- "
                              f"rerun the same command with {resume} to continue", 128 + sig)
    student = torch.cat([whole(p).detach().flatten() for p in adapter_params(transformer, "student")]).cpu().numpy()
    if len(set(gather(hashlib.sha256(student.tobytes()).hexdigest()))) > 1:  # every rank's student: checked, not assumed
        raise RuntimeError("the ranks ended with different students -- a bug in the gradient averaging: please report it")

    # --- everything that follows is export and diagnostics: every rank computes (--fsdp: its forwards are collectives), rank 0 writes ---
    # "before" is the base model (the untrained student, B = 0; with --init still the base, not the old student)
    before, after = (distances_to_teachers(transformer, data, sigmas, adapter) for adapter in (None, "student"))
    counts = collections.Counter(router.route(step).effect for step in range(cfg.max_steps))  # draws need no state
    visits = {e.name: counts[i] for i, e in enumerate(effects)} | {"general": counts[-1]}
    with writing(out / "lora.tmp", need):
        lora = export_lora(pipe, cfg, effects, bank, {"aop": aop, "router_visits": visits, "distance_to_teacher":
                                                      {"before": before, "after": after}}, old)
    del opt_student, opt_critic  # free Adam's moments (apply_update freed the gradients): the preview needs the encoders back
    with image_sizes(cfg):
        preview = write_preview(pipe, cfg, data)
    if rank > 0:
        return None
    print("8-step output vs teacher output (latent MSE), base model -> student:\n" + "\n".join(
        f"  {e.name:24s} {b0:.4f} -> {b1:.4f}   prompt: {e.student_prompt!r}" for e, b0, b1 in zip(effects, before, after)))
    print(f"router visits: {visits}")
    print(f"wrote {preview} -- one row per effect (first 16): source | teacher output | student "
          f"{cfg.student_steps}-step output (student prompt, seed {cfg.seed})")
    print(f"wrote {lora} -- load it with pipe.load_lora_weights('{lora}')")
    return lora


# ---- CLI ----

def main(argv=None) -> int:
    """The CLI: one line and an exit code for each way a run can end (under torchrun, said once: by rank 0)."""
    rank = int(os.environ.get("RANK", 0))
    try:
        train(parse_config(argv))
        return 0
    except InputError as e:
        message, code = f"error: {e}", 2
    except Stopped as e:
        message, code = e, e.code
    except torch.OutOfMemoryError:
        message, code = ("error: out of GPU memory -- see README 'Memory plan': keep --gradient_checkpointing, lower --rank or "
                         "--batch_size, or add GPUs (torchrun, --fsdp); checkpoints already written are kept: rerun with --resume"), 1
    except RuntimeError as e:  # under torchrun, mostly a collective that lost a rank (gloo: "Connection closed by peer")
        if not dist.is_initialized():
            raise
        print(f"rank {rank}: stopped ({str(e).splitlines()[0][:160]}) -- if another rank died, torchrun's report names it; "
              f"the checkpoints already written are kept: rerun with --resume", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        message, code = ("interrupted -- finished checkpoints and cached teacher targets are kept; rerun the same command "
                         "(with --resume once a checkpoint exists)"), 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(message, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
