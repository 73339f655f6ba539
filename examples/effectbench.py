"""
Toy EffectBench: a CPU-sized world where the truth of every edit is known exactly.

    python examples/effectbench.py --quick              # 4 effects, world -> base -> teachers -> distil -> table
    python examples/effectbench.py --effects 50 --seed 0
    python examples/effectbench.py --effects 10 --extend 4   # add 4 effects to that student (collectionlora --init)

The world (all of it deterministic from --seed, cached under runs/effectbench/):
  * sources   procedural 32x32 RGB pictures: a background (solid, gradient, stripes, checker, smooth
              noise, radial) and 1-3 shapes (disc, square, triangle, ring, cross). Train and held-out
              test pictures come from different RNG streams and are checked to be disjoint.
  * effects   >= 60 named edits, each `instruction` + `fn(image, variant)` + K, the number of valid
              outputs. K > 1 is a multi-modal effect (tint in one of K hues, shift in one of K
              directions, ...): a training pair shows one variant drawn at random, and any of the K is
              a correct answer. Near neighbours (roll 2 vs 3 cells, contrast 1.3 vs 1.8, red vs
              scarlet tint) and generic instructions shared by several effects are there on purpose.
              Everything is position-free (colour maps, local filters, rolls): a transformer that
              sees only relative positions (RoPE) cannot express flips or transposes, so there are none.
  * general   8 edits disjoint from the effects (other parameters of the same primitives) that
              pretrain the base and feed collectionlora's general stream.

The models: the real `QwenImageEditPlusPipeline` class with a tiny configuration built here (a
byte-level BPE tokenizer trained on the world's prompts, so the chat template is 64 tokens as in
Qwen; collectionlora's random tiny text encoder; a 3-layer, hidden-64 transformer; a VAE with two
downsamplings, 32x32x3 pixels <-> 8x8x4 latents, TRAINED here so that pictures are recognisable).
The transformer is pretrained by flow matching on the general set with 15 % prompt dropout (so CFG
has an unconditional branch); teachers are LoRAs of ranks 4/8/16 trained by flow matching per
effect and written as a real `--teachers` folder that `collectionlora.py --teachers` reads.

What is measured -- in PIXEL space, on decoded outputs, on held-out test sources. The reference for
"valid output k" is the VAE round trip decode(encode(fn(source, k))), so a perfect latent model
scores the same whatever the VAE's own error (the VAE's round-trip PSNR is reported separately):
  * PSNR to the nearest valid output, and PSNR to the teacher's output (same source, same seed);
  * mode coverage: over all (source, seed) of a K > 1 effect, the normalised entropy of which
    variant the output is nearest to (1 = all K variants equally often, 0 = always the same one);
  * bad-case ratio (BCR proxy): the output is nearer to another benchmark effect's valid output, or
    to the unedited source, than to any valid output of the requested effect;
  * energy score: per source, E|output - valid| - E|output - output'| / 2 over the seeds (RMS pixel distance, valid
    outputs drawn uniformly). Nearest-valid PSNR is a squared error, so it rewards a posterior mean (blur) over a sample;
    the energy score is a proper score for samples, so it does not (examples/LAB_NOTES.md, "Teachers that need CFG"). At
    4 seeds one model's score moves by sd ~0.002 (mostly the multi-modal effects): part 2's bar samples its three rows
    again at --energy_seeds (64) and compares them with standard errors (LAB_NOTES.md, "The energy score's noise");
  * NFE (transformer calls per edit), wall time per edit (the stock pipeline call, batch 1, one
    CPU thread), adapter bytes (the LoRA files).
Metrics are computed with a batched copy of the pipeline's loops (sample_teacher / sample_student);
stock_pipeline_check runs the same teacher edit through pipe(...) and asserts they agree (~1e-6).

Stages and cache (runs/effectbench/seed<S>/; each stage is skipped when its output exists):
  base_v<vae>_b<base>/   the trained base as a diffusers pipeline folder (what `collectionlora --base` loads)
  <tag>/teachers/        the --teachers folder: <effect>/{<effect>.safetensors, effect.json, images/ (32 sources)}
  <tag>_img<K>/          --images K: the same teachers with K sources each, and every student of them
  <tag>/general/         the --general folder: 16 pictures + .txt instructions
  <tag>/distil_<steps>/  collectionlora.train's --out (lora/, preview.png, checkpoints/, cache/)
  <tag>/report/          table.md, results.json (every number), grid.png
--quick (and seed 0) starts from the embedded collection in examples/toy/ (base + teachers; written by
--export_toy), so it only distils and measures. Costs on one CPU thread: VAE 4,000 steps ~11 min; base
2,500 steps ~3 min; a teacher 600 steps ~1 min; distillation at batch 8 ~0.2-0.4 s per iteration; evaluation
~15 s per effect. --jobs J (default 2) runs the teachers, and then the distillations, FM and Lightning,
in J processes of one thread each: the numbers do not depend on J.

Rows (all 8 steps unless named): the teachers (40 steps at CFG 1/2/3/5, and 8 plain steps), each
teacher stacked with the Lightning LoRA (our own distiller run on the general stream only), the
Lightning LoRA alone, the three merges of all teachers that peft's add_weighted_adapter offers (cat,
svd, ties_svd; each also + Lightning), "fm" (one LoRA trained by plain flow matching on every
effect's GROUND-TRUTH pairs with the student prompts: data the distiller never sees; also + Lightning),
"fm_teacher" (the paper's FM baseline: the same on the teachers' OUTPUTS for the distiller's sources; also + Lightning),
CollectionLoRA, and its four ablations (no PDSR: p_switch 1; no AOP: --no-aop; no TS: w_ts 0; no
TA-FM: w_fm 0 and no warm start). General edits (what PDSR is for): the 8 general instructions as written,
scored the same way, by the base at 40 and 8 steps, Lightning, CollectionLoRA and its ablations (an ablation
that loses them is worse too). A convergence curve: the student at every kept checkpoint.
Zero-shot composition: pairs (A, B) prompted "Please apply {A} to the input image, and then apply
{B}." against B(A(source)). The issue's bars are checked and printed.

    from effectbench import benchmark          # any effect set, no file edits
    benchmark({"invert": ("Invert the colours", lambda x: 1 - x)}, seed=0, ablations=False)
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl
from make_tiny_teachers import build_tiny_pipeline  # the random tiny pipeline (--base tiny)

SIZE = 32                # source pictures are SIZE x SIZE RGB
CELL = 4                 # pixels per latent cell (the VAE downsamples twice)
CONDITION = 64           # side of the condition image the text encoder sees
LATENT = SIZE // CELL    # 8x8x4 latents -> 4x4 = 16 transformer tokens per image (patch 2)


# ---- World: procedural source pictures ----

def _grid():
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    return yy, xx


def _colour(rng: random.Random) -> torch.Tensor:
    return torch.tensor([rng.random(), rng.random(), rng.random()])  # (3,)


def _background(rng: random.Random) -> torch.Tensor:
    yy, xx = _grid()
    a, b = _colour(rng), _colour(rng)
    kind = rng.choice(["solid", "gradient", "stripes", "checker", "noise", "radial"])
    if kind == "solid":
        w = torch.zeros(SIZE, SIZE)
    elif kind == "gradient":
        ang = rng.uniform(0, 2 * math.pi)
        w = (math.cos(ang) * xx + math.sin(ang) * yy) / SIZE
        w = (w - w.min()) / (w.max() - w.min())
    elif kind == "stripes":
        period, ang = rng.choice([8, 12, 16]), rng.choice([0, math.pi / 2, math.pi / 4])
        w = ((math.cos(ang) * xx + math.sin(ang) * yy) // (period / 2) % 2)
    elif kind == "checker":
        c = rng.choice([8, 16])
        w = ((xx // c + yy // c) % 2)
    elif kind == "noise":
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        w = F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
    else:  # radial
        cy, cx = rng.uniform(0, SIZE), rng.uniform(0, SIZE)
        w = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() / SIZE
        w = w.clamp(0, 1)
    return a[:, None, None] * (1 - w) + b[:, None, None] * w  # (3, H, W)


def _shape_mask(rng: random.Random) -> torch.Tensor:
    yy, xx = _grid()
    cy, cx, r = rng.uniform(6, SIZE - 6), rng.uniform(6, SIZE - 6), rng.uniform(4, 9)
    kind = rng.choice(["disc", "square", "triangle", "ring", "cross"])
    d = ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()
    if kind == "disc":
        return d <= r
    if kind == "square":
        return ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
    if kind == "triangle":
        return (yy - cy <= r) & (yy - cy >= -r) & ((xx - cx).abs() <= (yy - cy + r) / 2)
    if kind == "ring":
        return (d <= r) & (d >= r * 0.55)
    return (((yy - cy).abs() <= r / 3) & ((xx - cx).abs() <= r)) | (((xx - cx).abs() <= r / 3) & ((yy - cy).abs() <= r))


def make_source(rng: random.Random) -> torch.Tensor:
    """One procedural picture, (3, SIZE, SIZE) in [0, 1]."""
    img = _background(rng)
    for _ in range(rng.randint(1, 3)):
        m = _shape_mask(rng)
        img = torch.where(m[None], _colour(rng)[:, None, None], img)
    return img.clamp(0, 1)


def make_sources(n_train: int, n_test: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint train / held-out test pictures from separate RNG streams: (n, 3, SIZE, SIZE) each."""
    def key(x):
        return hashlib.sha256(to_uint8(x).numpy().tobytes()).hexdigest()
    train = [make_source(random.Random(f"{seed}/train/{i}")) for i in range(n_train)]
    seen = {key(x) for x in train}
    test, i = [], 0
    while len(test) < n_test:
        x = make_source(random.Random(f"{seed}/test/{i}"))
        i += 1
        if key(x) not in seen:  # held out means never seen, not just drawn from another stream
            test.append(x)
    return torch.stack(train), torch.stack(test)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().byte()


def to_pil(x: torch.Tensor):
    from PIL import Image
    return Image.fromarray(to_uint8(x).permute(1, 2, 0).numpy())


def from_pil(im) -> torch.Tensor:
    import numpy as np
    return torch.from_numpy(np.asarray(im.convert("RGB"), dtype="float32") / 255.0).permute(2, 0, 1)


# ---- World: effects ----
# An effect is (instruction, fn, K): fn(image (3, H, W) in [0, 1], variant in range(K)) -> image.
# K = 1 is deterministic; K > 1 has K equally valid outputs.

LUMA = torch.tensor([0.299, 0.587, 0.114])


def gray(x):
    return (LUMA[:, None, None] * x).sum(0, keepdim=True).expand_as(x)


def hue_rotate(x, degrees):
    """Rotate hue about the grey axis (a linear colour map)."""
    a = math.radians(degrees)
    k = torch.ones(3, 3) / 3
    cross = torch.tensor([[0, -1, 1], [1, 0, -1], [-1, 1, 0]], dtype=torch.float32) / math.sqrt(3)
    m = math.cos(a) * torch.eye(3) + (1 - math.cos(a)) * k + math.sin(a) * cross
    return torch.einsum("ij,jhw->ihw", m, x).clamp(0, 1)


def tint(x, rgb, strength=0.5):
    return ((1 - strength) * x + strength * gray(x) * torch.tensor(rgb)[:, None, None] * 1.6).clamp(0, 1)


def box_blur(x, k):
    return F.avg_pool2d(F.pad(x[None], (k // 2,) * 4, mode="circular"), k, stride=1)[0]


def sharpen(x):
    return (2 * x - box_blur(x, 3)).clamp(0, 1)


def edges(x):
    g = gray(x)[:1][None]
    kx = torch.tensor([[[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]]], dtype=torch.float32)
    gp = F.pad(g, (1, 1, 1, 1), mode="circular")
    mag = (F.conv2d(gp, kx) ** 2 + F.conv2d(gp, kx.transpose(2, 3)) ** 2).sqrt()[0]
    return (mag / 2).clamp(0, 1).expand(3, -1, -1)


def posterize(x, levels):
    return (x * (levels - 1)).round() / (levels - 1)


def pixelate(x, block):
    return F.interpolate(F.avg_pool2d(x[None], block), scale_factor=block, mode="nearest")[0]


def roll(x, dy_cells, dx_cells):
    return torch.roll(x, (dy_cells * CELL, dx_cells * CELL), dims=(1, 2))


def contrast(x, c):
    return ((x - 0.5) * c + 0.5).clamp(0, 1)


def saturate(x, s):
    return (gray(x) + s * (x - gray(x))).clamp(0, 1)


def duotone(x, dark, light):
    g = gray(x)[:1]
    return (1 - g) * torch.tensor(dark)[:, None, None] + g * torch.tensor(light)[:, None, None]


def only_channel(x, c):
    out = torch.zeros_like(x)
    out[c] = x[c]
    return out


def invert_channel(x, c):
    out = x.clone()
    out[c] = 1 - x[c]
    return out


def permute(x, order):
    return x[list(order)]


def choice(*fns):
    """A multi-modal effect from K deterministic alternatives: fn(x, variant) = fns[variant](x)."""
    return (lambda x, v: fns[v](x)), len(fns)


def det(fn):
    """A deterministic effect: K = 1, the variant is ignored."""
    return (lambda x, v: fn(x)), 1


RED, SCARLET, GREEN, BLUE, YELLOW, CYAN, MAGENTA, ORANGE, TEAL = (
    (1.0, 0.25, 0.25), (1.0, 0.5, 0.15), (0.3, 1.0, 0.3), (0.3, 0.4, 1.0), (1.0, 0.95, 0.3),
    (0.3, 1.0, 1.0), (1.0, 0.3, 1.0), (1.0, 0.6, 0.2), (0.2, 0.8, 0.7))

# Generic instructions that several effects share on purpose (EffectBench's "make it vintage" problem):
# a model that reads only the instruction cannot tell these effects apart; triggers (AOP) can.
STYLIZE, RECOLOUR, SHIFT, FILTER = "Stylize the image", "Recolour the picture", "Shift the picture", "Apply a colour filter"


def effect_registry() -> dict:
    """name -> (instruction, fn, K). Order matters: `--effects N` takes the first N, interleaved so
    that any prefix mixes deterministic, multi-modal, near-neighbour and colliding effects."""
    e = {}

    def add(name, instruction, fk):
        fn, k = fk
        e[name] = (instruction, fn, k)

    # interleaved: multi-modal, deterministic, near-neighbour pairs and colliding instructions
    add("tint_any", "Give the picture a colour tint", choice(*(lambda x, c=c: tint(x, c, 0.8) for c in (RED, GREEN, BLUE, YELLOW))))
    add("roll_right_2", "Roll the image two cells to the right", det(lambda x: roll(x, 0, 2)))
    add("roll_right_3", "Roll the image three cells to the right", det(lambda x: roll(x, 0, 3)))
    add("invert", "Invert the colours", det(lambda x: 1 - x))
    add("shift_any", SHIFT, choice(*(lambda x, d=d: roll(x, *d) for d in ((0, 1), (0, -1), (1, 0), (-1, 0)))))
    add("tint_red", "Tint it red", det(lambda x: tint(x, RED)))
    add("tint_scarlet", "Tint it scarlet", det(lambda x: tint(x, SCARLET)))
    add("swap_invert_any", "Swap and invert the colours", choice(lambda x: 1 - permute(x, (2, 1, 0)), lambda x: 1 - permute(x, (1, 0, 2))))
    add("channel_swap_any", "Swap two colour channels", choice(*(lambda x, o=o: permute(x, o) for o in ((1, 0, 2), (2, 1, 0), (0, 2, 1)))))
    add("contrast_1_3", "Raise the contrast a little", det(lambda x: contrast(x, 1.3)))
    add("contrast_1_8", "Raise the contrast a lot", det(lambda x: contrast(x, 1.8)))
    add("grayscale", "Make it black and white", det(gray))
    add("exposure_any", "Change the exposure", choice(lambda x: (x + 0.5).clamp(0, 1), lambda x: (x - 0.5).clamp(0, 1)))
    add("stylize_posterize", STYLIZE, det(lambda x: posterize(saturate(x, 1.8), 4)))
    add("stylize_duotone", STYLIZE, det(lambda x: duotone(x, (0.0, 0.0, 0.5), (1.0, 1.0, 0.0))))
    add("sepia", "Make it look like an old sepia photo", det(lambda x: duotone(x, (0.2, 0.1, 0.05), (1.0, 0.9, 0.7))))
    add("hue_any", "Rotate the hues", choice(*(lambda x, a=a: hue_rotate(x, a) for a in (90, 160, 270))))
    add("roll_down_2", "Roll the image two cells down", det(lambda x: roll(x, 2, 0)))
    add("roll_down_3", "Roll the image three cells down", det(lambda x: roll(x, 3, 0)))
    add("blur", "Blur the picture", det(lambda x: box_blur(x, 5)))
    add("posterize_any", "Reduce the number of colour levels", choice(*(lambda x, n=n: posterize(x, n) for n in (2, 3, 4))))
    add("recolour_hue_30", RECOLOUR, det(lambda x: hue_rotate(x, 30)))
    add("recolour_hue_330", RECOLOUR, det(lambda x: hue_rotate(x, 330)))
    add("perm_gbr", "Cycle the colour channels forwards", det(lambda x: permute(x, (1, 2, 0))))
    add("invert_channel_any", "Invert one colour channel", choice(*(lambda x, c=c: invert_channel(x, c) for c in range(3))))
    add("brighten_20", "Brighten the picture slightly", det(lambda x: (x + 0.2).clamp(0, 1)))
    add("brighten_35", "Brighten the picture strongly", det(lambda x: (x + 0.35).clamp(0, 1)))
    add("edges", "Show only the edges", det(edges))
    add("mono_any", "Make it monochrome", choice(lambda x: duotone(x, (0.0, 0.1, 0.2), (0.7, 0.9, 1.0)),
                                               lambda x: duotone(x, (0.0, 0.15, 0.0), (0.75, 1.0, 0.75))))
    add("filter_green", FILTER, det(lambda x: tint(x, GREEN)))
    add("filter_blue", FILTER, det(lambda x: tint(x, BLUE)))
    add("pastel_any", "Make it pastel", choice(*(lambda x, c=c: 0.5 * x + 0.5 * torch.tensor(c)[:, None, None]
                                                 for c in ((1.0, 0.8, 0.85), (0.8, 1.0, 0.85), (0.8, 0.85, 1.0)))))
    add("contrast_any", "Change the contrast", choice(lambda x: contrast(x, 3.0), lambda x: contrast(x, 0.4)))
    add("roll_left_2", "Roll the image two cells to the left", det(lambda x: roll(x, 0, -2)))
    add("roll_up_2", "Roll the image two cells up", det(lambda x: roll(x, -2, 0)))
    add("solarize", "Solarize the picture", det(lambda x: torch.where(x > 0.5, 1 - x, x)))
    add("keep_channel_any", "Keep a single colour channel", choice(*(lambda x, c=c: only_channel(x, c) for c in range(3))))
    add("gamma_dark", "Deepen the shadows", det(lambda x: x ** 2.0))
    add("gamma_light", "Lift the shadows", det(lambda x: x ** 0.4))
    add("threshold", "Turn it into pure black and white", det(lambda x: (gray(x) > 0.5).float()))
    add("duotone_any", "Turn it into a duotone", choice(lambda x: duotone(x, (0.1, 0.0, 0.3), (1.0, 0.8, 0.3)),
                                                       lambda x: duotone(x, (0.0, 0.2, 0.1), (0.9, 1.0, 0.6)),
                                                       lambda x: duotone(x, (0.3, 0.0, 0.0), (1.0, 0.7, 0.8))))
    add("saturate", "Make the colours vivid", det(lambda x: saturate(x, 2.0)))
    add("desaturate", "Mute the colours", det(lambda x: saturate(x, 0.35)))
    add("pixelate", "Pixelate the picture", det(lambda x: pixelate(x, 8)))
    add("stylize_edges_invert", STYLIZE, det(lambda x: 1 - edges(x)))
    add("roll_diag_any", "Roll the image diagonally", choice(lambda x: roll(x, 2, 2), lambda x: roll(x, -2, -2)))
    add("tint_orange", "Tint it orange", det(lambda x: tint(x, ORANGE)))
    add("tint_teal", "Tint it teal", det(lambda x: tint(x, TEAL)))
    add("perm_brg", "Cycle the colour channels backwards", det(lambda x: permute(x, (2, 0, 1))))
    add("edge_colour_any", "Draw the edges in colour", choice(*(lambda x, c=c: edges(x) * torch.tensor(c)[:, None, None]
                                                                for c in ((1.0, 0.2, 0.2), (0.2, 1.0, 0.2), (0.2, 0.4, 1.0)))))
    add("recolour_invert_hue", RECOLOUR, det(lambda x: hue_rotate(1 - x, 90)))
    add("darken", "Darken the picture", det(lambda x: (x - 0.25).clamp(0, 1)))
    add("cast_any", "Add a colour cast", choice(*(lambda x, c=c: (x + 0.3 * (torch.tensor(c)[:, None, None] - 0.6)).clamp(0, 1)
                                                  for c in (RED, GREEN, BLUE, YELLOW))))
    add("invert_gb", "Invert the green and blue channels", det(lambda x: 1 - invert_channel(x, 0)))
    add("negative_tint_any", "Make a tinted negative", choice(lambda x: tint(1 - x, ORANGE, 0.7), lambda x: tint(1 - x, CYAN, 0.7)))
    add("roll_far_any", "Move the picture far", choice(lambda x: roll(x, 3, 3), lambda x: roll(x, -3, 3)))
    add("filter_magenta", FILTER, det(lambda x: tint(x, MAGENTA)))
    add("threshold_any", "Cut it to two tones", choice(lambda x: (gray(x) > 0.3).float(), lambda x: (gray(x) > 0.7).float()))
    add("invert_gray", "Make it a black and white negative", det(lambda x: 1 - gray(x)))
    add("saturation_any", "Change the saturation", choice(lambda x: saturate(x, 3.5), lambda x: saturate(x, 0.65)))
    add("blur_strong", "Blur the picture heavily", det(lambda x: box_blur(x, 9)))
    add("stylize_solarize_tint", STYLIZE, det(lambda x: tint(torch.where(x > 0.5, 1 - x, x), CYAN)))
    add("gamma_any", "Change the gamma", choice(lambda x: x ** 3.0, lambda x: x ** 0.25))
    return e


# The general edits (pretraining + collectionlora's general stream): the same primitives with other
# parameters, so the base learns to edit without ever seeing a benchmark effect.
GENERAL_EDITS = {
    "Keep the picture as it is": lambda x: x,
    "Roll the image one cell diagonally": lambda x: roll(x, 1, 1),
    "Roll the image two cells up and one left": lambda x: roll(x, -2, -1),
    "Lower the contrast": lambda x: contrast(x, 0.7),
    "Fade towards white": lambda x: 0.6 * x + 0.4,
    "Rotate the hues a little": lambda x: hue_rotate(x, 45),
    "Soften the picture": lambda x: box_blur(x, 3) * 0.5 + x * 0.5,
    "Boost the green channel": lambda x: (x + torch.tensor([0.0, 0.25, 0.0])[:, None, None]).clamp(0, 1),
}


@dataclass
class Effect:
    name: str
    instruction: str
    fn: Callable         # fn(image (3, H, W), variant) -> image
    K: int               # number of valid outputs

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """All K valid outputs of one source: (K, 3, H, W)."""
        return torch.stack([self.fn(x, v) for v in range(self.K)])


# The general edits as one-output "effects": what PDSR's general stream is there to keep (run() measures them)
GENERAL_EFFECTS = [Effect(f"general_{i}", text, lambda x, v, f=f: f(x), 1) for i, (text, f) in enumerate(GENERAL_EDITS.items())]


@dataclass
class World:
    effects: list        # [Effect]
    train: torch.Tensor  # (n_train, 3, SIZE, SIZE) source pictures for training
    test: torch.Tensor   # (n_test, 3, SIZE, SIZE) held-out source pictures
    seed: int


def build_world(effects: dict, seed: int, n_train: int = 256, n_test: int = 16) -> World:
    """The toy world from an effect dict {name: (instruction, fn) or (instruction, fn, K)} and a seed.
    fn(image, variant) -> image; K (default 1) is how many variants are valid outputs."""
    out = [Effect(name, spec[0], spec[1], spec[2] if len(spec) == 3 else 1) for name, spec in effects.items()]
    train, test = make_sources(n_train, n_test, seed)
    return World(out, train, test, seed)


def check_registry(effects: list, probes: torch.Tensor, min_mse: float = 3e-4) -> None:
    """Everything about an effect set that can be checked before any stage runs, as one-line InputErrors: names that
    make folder names, instructions, K, every fn(image, variant) giving a (3, SIZE, SIZE) picture in [0, 1] -- and no
    two valid outputs (of any effects, or the source itself) the same picture on average over the probe sources, or
    the bad-case ratio could not tell them apart (near neighbours may be close; exact duplicates are an error)."""
    for e in effects:
        if not (isinstance(e.name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", e.name)):
            raise cl.InputError(f"effect name {e.name!r} is not a plain folder name -- use letters, digits, _ . -")
        if not (isinstance(e.instruction, str) and e.instruction.strip()) or not callable(e.fn):
            raise cl.InputError(f"effect {e.name!r} must be (instruction, fn) or (instruction, fn, K) with a non-empty "
                                f"instruction string and a function")
        if not (isinstance(e.K, int) and e.K >= 1):
            raise cl.InputError(f"effect {e.name!r} has K = {e.K!r} valid outputs -- K must be an integer >= 1")
    outs = []
    for e in effects:
        for v in range(e.K):
            try:
                y = torch.stack([e.fn(x, v) for x in probes])
            except Exception as err:  # the user's function, any error
                raise cl.InputError(f"effect {e.name!r}, variant {v}: fn failed ({type(err).__name__}: {err})") from err
            if y.shape != probes.shape or not (y.isfinite().all() and 0 <= y.min() and y.max() <= 1):
                raise cl.InputError(f"effect {e.name!r}, variant {v}: fn must return a (3, {SIZE}, {SIZE}) picture "
                                    f"in [0, 1], got {tuple(y.shape[1:])} in [{y.min():.3g}, {y.max():.3g}]")
            outs.append(((e.name, v), y))
    outs.append((("source", 0), probes))
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            if F.mse_loss(outs[i][1], outs[j][1]) < min_mse:
                raise cl.InputError(f"effects {outs[i][0]} and {outs[j][0]} give (nearly) the same picture -- change one")


# ---- Tiny base pipeline: the real QwenImageEditPlusPipeline class, built in code ----

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]


def train_tokenizer(template: str, prompts: list):
    """A byte-level BPE trained on the chat template and the world's prompts, so every known word is
    one token (the system prompt is 64 tokens, exactly Qwen's drop index) and unknown strings such as
    triggers fall back to bytes. Few tokens keep the joint attention cheap."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    byte_level = build_tiny_pipeline(0).tokenizer.backend_tokenizer.pre_tokenizer
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = byte_level
    t.add_special_tokens(SPECIAL)
    img = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
    t.train_from_iterator([template.format(img + p) for p in prompts],
                          trainers.BpeTrainer(vocab_size=20000, min_frequency=1, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(t.to_str())["model"]
    # ids 0..262 exactly as collectionlora's tiny tokenizer (bytes, then the special tokens), so the text
    # encoder's image/vision token ids stay valid; merged words get the ids after them
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({tok: len(vocab) + i for i, tok in enumerate(SPECIAL)})
    for tok in model["vocab"]:
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return vocab, merges


def make_vae():
    """AutoencoderKLQwenImage with two spatial downsamplings: 32x32x3 pixels <-> 8x8x4 latents."""
    from diffusers import AutoencoderKLQwenImage
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                  temperal_downsample=[False, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def make_transformer():
    """3 layers, hidden 64 (4 heads x 16): ~0.48M parameters, as in DESIGN §9."""
    from diffusers import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                                       num_attention_heads=4, joint_attention_dim=16, axes_dims_rope=(8, 4, 4))


def assemble_pipeline(vae, transformer, vocab, merges, seed: int, text_width: int = 16):
    """collectionlora's tiny pipeline with our tokenizer, VAE and transformer swapped in. The text
    encoder stays collectionlora's random one, `text_width` wide (never trained: the transformer learns to read it)."""
    from diffusers import QwenImageEditPlusPipeline
    from transformers import Qwen2Tokenizer
    tiny = build_tiny_pipeline(seed, hidden=text_width)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=SPECIAL[1:])
    torch.manual_seed(seed)
    tiny.text_encoder.resize_token_embeddings(len(vocab), mean_resizing=False)  # rows for the merged words (load_base overwrites them)
    processor = cl.ImageOnlyProcessor(tiny.processor.image_processor, tokenizer)
    pipe = QwenImageEditPlusPipeline(scheduler=tiny.scheduler, vae=vae.eval(), text_encoder=tiny.text_encoder,
                                     tokenizer=tokenizer, processor=processor, transformer=transformer.eval())
    pipe.register_to_config(processor=cl.STOCK_PROCESSOR)  # save_pretrained writes a folder collectionlora --base reads
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_base(pipe, folder: Path, info: dict) -> None:
    """A standard diffusers pipeline folder (what `collectionlora.py --base <folder>` loads), plus our notes."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    (tmp / "effectbench_base.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def load_base(folder) -> object:
    """The saved base, loaded exactly as collectionlora loads any --base folder (CPU, fp32)."""
    pipe = cl.load_pipeline(str(folder), torch.device("cpu"), torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def bench_sizes():
    """The stock pipeline resizes inputs to module-global areas: condition image 64^2, VAE image 32^2."""
    with cl.tiny_image_sizes(condition=CONDITION * CONDITION, vae=SIZE * SIZE):
        yield


# ---- Latents and prompts: what the pipeline feeds the transformer, batched ----

@torch.no_grad()
def pack(pipe, images: torch.Tensor) -> torch.Tensor:
    """Pixels (B, 3, SIZE, SIZE) in [0, 1] -> normalised packed latents (B, L, 16), exactly as the
    pipeline encodes a source image (VAE mode, (z - mean) / std, 2x2 patches)."""
    vae = pipe.vae
    x = to_uint8(images).float() / 127.5 - 1  # the pipeline sees 8-bit PNGs in [-1, 1]
    z = vae.encode(x.unsqueeze(2)).latent_dist.mode()  # (B, 4, 1, 8, 8)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    z = (z - mean) / std
    return pipe._pack_latents(z, z.shape[0], z.shape[1], LATENT, LATENT)  # (B, 16, 16)


@torch.no_grad()
def unpack(pipe, latents: torch.Tensor) -> torch.Tensor:
    """Packed latents (B, L, 16) -> pixels (B, 3, SIZE, SIZE) in [0, 1] (the pipeline's decode)."""
    vae = pipe.vae
    z = pipe._unpack_latents(latents, SIZE, SIZE, pipe.vae_scale_factor)  # (B, 4, 1, 8, 8)
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    x = vae.decode(z * std + mean).sample[:, :, 0]  # (B, 3, SIZE, SIZE)
    return ((x + 1) / 2).clamp(0, 1)


@dataclass
class Prompts:
    """Text-encoder states of (prompt, source image) pairs, padded to one length: the batched
    equivalent of collectionlora.EditInputs.embeds / mask."""
    embeds: torch.Tensor   # (N, T, 16)
    mask: torch.Tensor     # (N, T) long

    def __getitem__(self, idx):
        return Prompts(self.embeds[idx], self.mask[idx])


@torch.no_grad()
def encode_prompts(pipe, images: torch.Tensor, prompts: list) -> Prompts:
    """One encode per (image, prompt), through the pipeline's own encode_prompt (the text encoder also
    sees the condition image, as in Qwen-Image-Edit); right-padded (mask 0) to the longest of them."""
    encoded = [pipe.encode_prompt(prompt=[p], image=[pipe.image_processor.resize(to_pil(img), 64, 64)],
                                  device=torch.device("cpu")) for img, p in zip(images, prompts)]
    return concat_prompts(*(Prompts(e, torch.ones(e.shape[:2], dtype=torch.long) if m is None else m.long())
                            for e, m in encoded))


def concat_prompts(*ps: Prompts) -> Prompts:
    """Prompts of any lengths as one batch, each right-padded to the longest (the transformer masks the padding)."""
    T = max(p.embeds.shape[1] for p in ps)
    return Prompts(torch.cat([F.pad(p.embeds, (0, 0, 0, T - p.embeds.shape[1])) for p in ps]),
                   torch.cat([F.pad(p.mask, (0, T - p.mask.shape[1])) for p in ps]))


def predict_v(transformer, x_t, sigma, source, p: Prompts):
    """Batched collectionlora.predict_v: x_t, source (B, L, 16), sigma (B,) -> v (B, L, 16)."""
    B, L = x_t.shape[:2]
    side = int(L ** 0.5)
    v = transformer(hidden_states=torch.cat([x_t, source], 1), timestep=sigma, encoder_hidden_states=p.embeds,
                    encoder_hidden_states_mask=p.mask, img_shapes=[[(1, side, side), (1, side, side)]] * B,
                    return_dict=False)[0]
    return v[:, :L]


# ---- Training: VAE, base, teachers (all flow matching / reconstruction on CPU) ----

def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLQwenImage._decode for one frame without its final clamp to [-1, 1] (a clamped pixel
    on the wrong side would get no gradient): (B, z, 1, h, w) -> (B, 3, 1, H, W)."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


def train_vae(vae, images: torch.Tensor, steps: int, seed: int, batch: int = 16, lr: float = 1e-3) -> None:
    """A plain autoencoder (decode the posterior mode; a tiny L2 on z keeps its scale in check), then
    latents_mean / latents_std are set to the data's per-channel statistics so the transformer sees
    unit-scale latents, as with the real Qwen VAE. (2,000 steps at a constant 1e-3 reached 21 dB on
    held-out sources; the curve was still rising slowly.)"""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)] * 2 - 1  # (B, 3, H, W) in [-1, 1]
        z = vae.encode(x.unsqueeze(2)).latent_dist.mode()                     # (B, 4, 1, H/4, W/4)
        loss = F.mse_loss(decode_unclamped(vae, z)[:, :, 0], x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(images[i:i + 64].unsqueeze(2) * 2 - 1).latent_dist.mode() for i in range(0, len(images), 64)])
    vae.register_to_config(latents_mean=z.mean((0, 2, 3, 4)).tolist(), latents_std=z.std((0, 2, 3, 4)).tolist())


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for pixels in [0, 1]: (B, ...) -> (B,)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return 10 * torch.log10(1 / mse)


def fm_train(transformer, params, source, target_fn, prompts: Prompts, empty: Prompts, steps: int, lr: float,
             seed: int, batch: int = 32, p_drop: float = 0.15, what: str = "fm") -> list:
    """Flow matching on edit pairs: for a batch of pair indices i, x0 = target_fn(i, g) (B, L, 16),
    the condition is source[i] with prompts[i], or the empty prompt with probability p_drop (so the
    model also learns the unconditional branch CFG needs). sigma ~ U(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    both = concat_prompts(prompts, empty)  # one length, for torch.where below
    prompts, empty = both[: len(prompts.embeds)], both[len(prompts.embeds):]
    opt = torch.optim.AdamW(params, lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    losses = []
    transformer.train()
    for step in range(steps):
        i = torch.randint(len(source), (batch,), generator=g)
        x0 = target_fn(i, g)                                  # (B, L, 16)
        drop = torch.rand(batch, generator=g) < p_drop
        p = Prompts(torch.where(drop[:, None, None], empty.embeds[i], prompts.embeds[i]),
                    torch.where(drop[:, None], empty.mask[i], prompts.mask[i]))
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.rand(batch, generator=g)
        x_t = cl.add_noise(x0, eps, sigma[:, None, None])
        loss = cl.flow_matching_loss(predict_v(transformer, x_t, sigma, source[i], p), x0, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 250 == 0 or step == steps - 1:
            log(f"{what} step {step}/{steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    transformer.eval()
    return losses


# ---- Samplers: the stock pipeline's loops, batched (checked against pipe(...) in stock_pipeline_check) ----

def teacher_sigmas(scheduler, steps: int, seq_len: int) -> torch.Tensor:
    """The sigmas the stock pipeline visits with its own (dynamically shifted) scheduler, ending at 0."""
    import copy

    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_shift
    s = copy.deepcopy(scheduler)
    c = s.config
    mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                         c.get("base_shift", 0.5), c.get("max_shift", 1.15))
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return s.sigmas.float()  # (steps + 1,)


@torch.no_grad()
def sample_teacher(transformer, noise, source, p: Prompts, empty: Prompts, sigmas, g: float):
    """Euler over `sigmas` with the pipeline's true CFG (guided velocity rescaled to the conditional
    norm) when g > 1. NFE = 2 (len(sigmas) - 1) with CFG, else len(sigmas) - 1."""
    x = noise
    for i in range(len(sigmas) - 1):
        s = sigmas[i].expand(len(x))
        v = predict_v(transformer, x, s, source, p)
        if g > 1:
            comb = predict_v(transformer, x, s, source, empty)
            comb = comb + g * (v - comb)
            v = comb * (v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


@torch.no_grad()
def sample_student(transformer, noise, source, p: Prompts, steps: int, gen: torch.Generator):
    """collectionlora's 8-step sampler: predict x0, re-noise to the next sigma with fresh noise."""
    sigmas = cl.student_sigmas(steps, 3.0)
    x = noise
    for i in range(steps):
        x0 = cl.x0_from_v(x, predict_v(transformer, x, sigmas[i].expand(len(x)), source, p), sigmas[i])
        x = cl.add_noise(x0, torch.randn(x0.shape, generator=gen), sigmas[i + 1]) if i + 1 < steps else x0
    return x


# ---- Stages (each cached on disk; delete its folder to redo it) ----

def stage_base(world: World, folder: Path, seed: int, vae_steps: int, base_steps: int, vae=None, transformer=make_transformer,
               text_width: int = 16) -> dict:
    """Train the VAE (or take a trained one), then pretrain the transformer (transformer() builds it; its joint_attention_dim
    is the text encoder's text_width) by flow matching on the general edits. examples/room_*.py vary the last three."""
    if (folder / "effectbench_base.json").is_file():
        return json.loads((folder / "effectbench_base.json").read_text())
    t0 = time.time()
    prompts = list(GENERAL_EDITS) + [e.instruction for e in world.effects]
    vocab, merges = train_tokenizer(build_tiny_pipeline(seed).prompt_template_encode, prompts + [""])
    torch.manual_seed(seed)
    pipe = assemble_pipeline(make_vae() if vae is None else vae, transformer(), vocab, merges, seed, text_width)
    # The VAE sees its own stream of procedural pictures (half of them through a general edit): no effect
    # output, no held-out source. 512 pictures over-fitted (23 dB train, 19 dB held-out); 4096 are cheap.
    rng = random.Random(f"{seed}/vae")
    edits = list(GENERAL_EDITS.values())
    images = torch.stack([make_source(random.Random(f"{seed}/vae/{i}")) for i in range(4096)])
    images = torch.stack([rng.choice(edits)(x) if i % 2 else x for i, x in enumerate(images)])
    if vae is None:
        train_vae(pipe.vae, images, vae_steps, seed)
    rt = psnr(unpack(pipe, pack(pipe, world.test)), world.test).mean().item()
    log(f"VAE round trip on held-out sources: {rt:.2f} dB ({time.time() - t0:.0f} s)")
    # general edit pairs: every train source x every general instruction
    n, names = len(world.train), list(GENERAL_EDITS)
    src = pack(pipe, world.train)                                              # (n, L, 16)
    tgt = torch.stack([pack(pipe, torch.stack([GENERAL_EDITS[k](x) for x in world.train])) for k in names])  # (J, n, L, 16)
    t1 = time.time()
    p = [encode_prompts(pipe, world.train, [k] * n) for k in names]
    empty = encode_prompts(pipe, world.train, [""] * n)
    log(f"encoded {n * (len(names) + 1)} (image, prompt) pairs in {time.time() - t1:.0f} s")
    J = len(names)
    allp = concat_prompts(*p)  # pair index = j * n + i
    losses = fm_train(pipe.transformer, list(pipe.transformer.parameters()), src.repeat(J, 1, 1),
                      lambda i, g: tgt.reshape(J * n, *tgt.shape[2:])[i], allp, Prompts(empty.embeds.repeat(J, 1, 1),
                      empty.mask.repeat(J, 1)), base_steps, 1e-3, seed, what="base")
    info = {"vae_roundtrip_psnr_test": rt, "vae_steps": vae_steps, "base_steps": base_steps,
            "base_final_loss": sum(losses[-50:]) / 50, "seconds": time.time() - t0}
    save_base(pipe, folder, {"seed": seed, **info})
    return info


def lora_config(rank: int):
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=list(cl.QWEN_TARGET_MODULES), init_lora_weights=True)


# Each teacher folder's images/: train[0:IMAGES]; the general folder: the next GENERAL train sources (--images: more after them)
IMAGES, GENERAL = 32, 16
# --quick's default --images: the teachers learnt from all 256 train sources; with 32 of them (and their teacher outputs)
# the distiller's warm start ended at energy 0.0811, with 240 at 0.0582 and 0.0594, level with the teacher's 8 steps
# (0.0587; LAB_NOTES.md: "The gap was source images with teacher outputs"). It costs 4 x 8 x 240 teacher edits (~30 min of a core, cached).
QUICK_IMAGES = 240


def stage_teachers(world: World, effects: list, base: Path, folder: Path, general: Path, steps: int, seed: int,
                   n_images: int = IMAGES, n_general: int = GENERAL, part: tuple = (0, 1)) -> dict:
    """One LoRA per effect (ranks cycle 4, 8, 16), flow matching on (source, fn(source, random variant))
    with the effect's instruction; written as a collectionlora --teachers folder, plus --general.
    part (j, J): only the effects k with k % J == j (each teacher is seeded by k alone)."""
    from peft.utils import get_peft_model_state_dict
    pipe = load_base(base)
    n = len(world.train)
    src = pack(pipe, world.train)
    empty = encode_prompts(pipe, world.train, [""] * n)
    report = {}
    for k, e in enumerate(effects):
        out = folder / e.name
        if k % part[1] != part[0]:  # another process's share (see in_parallel)
            continue
        if (out / "effect.json").is_file():
            report[e.name] = json.loads((out / "effect.json").read_text())
            continue
        t0 = time.time()
        rank = (4, 8, 16)[k % 3]
        tgt = torch.stack([pack(pipe, torch.stack([e.fn(x, v) for x in world.train])) for v in range(e.K)])  # (K, n, L, 16)
        p = encode_prompts(pipe, world.train, [e.instruction] * n)
        torch.manual_seed(seed + k)  # the LoRA init (peft draws A from the global RNG)
        pipe.transformer.add_adapter(lora_config(rank), adapter_name=e.name)
        pipe.transformer.set_adapter(e.name)
        params = cl.adapter_params(pipe.transformer, e.name)
        losses = fm_train(pipe.transformer, params, src,
                          lambda i, g, tgt=tgt: tgt[torch.randint(len(tgt), (len(i),), generator=g), i],  # a random valid variant
                          p, empty, steps, 3e-3, seed + k, what=f"teacher {e.name} (r{rank})")
        tmp = folder / (e.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        config = pipe.transformer.peft_config[e.name].to_dict()  # target_modules is a set: sorted, so files repeat byte for byte
        type(pipe).save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name=e.name),
                                     transformer_lora_adapter_metadata=config | {"target_modules": sorted(config["target_modules"])},
                                     weight_name=f"{e.name}.safetensors")
        pipe.transformer.delete_adapters(e.name)
        (tmp / "images").mkdir()
        for j in range(n_images):
            to_pil(world.train[j]).save(tmp / "images" / f"{j}.png")
        meta = {"instruction": e.instruction, "variants": e.K, "rank": rank, "steps": steps,
                "final_loss": sum(losses[-50:]) / 50, "seconds": time.time() - t0}
        (tmp / "effect.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        report[e.name] = meta
        log(f"teacher {e.name}: rank {rank}, {steps} steps, {time.time() - t0:.0f} s")
    if part[1] > 1:
        return report
    general.mkdir(parents=True, exist_ok=True)
    for j in range(n_general):  # general stream: train sources (after the teachers' images) with general instructions
        to_pil(world.train[n_images + j]).save(general / f"{j}.png")
        (general / f"{j}.txt").write_text(list(GENERAL_EDITS)[j % len(GENERAL_EDITS)])
    return report


def stage_fm(world: World, effects: list, base: Path, folder: Path, prompts: dict, rank: int, steps: int, seed: int,
             teachers: Path | None = None, guidance: float = 2.0, per_source: int = 1) -> Path:
    """An FM baseline: ONE LoRA trained by plain flow matching on every effect's edit pairs with the student prompts;
    no distillation. teachers None: the ground-truth pairs (source, fn(source, random variant)) on every train source,
    the data the teachers saw (an upper bound: the distiller never sees it). teachers given: the paper's "FM" baseline,
    the teachers' own outputs (40 steps, CFG `guidance`, `per_source` per source, each its own noise) on the same source
    images the distiller gets (each effect's images/ folder) -- the data of the distiller's TA-FM term."""
    from peft.utils import get_peft_model_state_dict
    from PIL import Image
    if (folder / "pytorch_lora_weights.safetensors").is_file():
        return folder
    pipe = load_base(base)
    if teachers is None:
        srcs = [world.train] * len(effects)
        tgts = [torch.stack([pack(pipe, torch.stack([e.fn(x, v) for x in world.train])) for v in range(e.K)]) for e in effects]
    else:
        srcs = [torch.stack([from_pil(Image.open(f)) for f in sorted((teachers / e.name / "images").glob("*.png"),
                                                                    key=lambda f: int(f.stem))]) for e in effects]
        tgts = [torch.stack([teacher_outputs(pipe, teachers, e, x, guidance, seed + k) for k in range(per_source)])
                for e, x in zip(effects, srcs)]  # (per_source, n, L, 16)
    pair = [(j, k) for j, x in enumerate(srcs) for k in range(len(x))]  # pair index -> (effect j, source k)

    def target(i, g):  # a random valid variant (or one of the teacher's outputs) of each pair's effect
        return torch.stack([tgts[j][torch.randint(len(tgts[j]), (), generator=g), k] for j, k in (pair[t] for t in i.tolist())])

    source = torch.cat([pack(pipe, x) for x in srcs])
    ps = concat_prompts(*(encode_prompts(pipe, x, [prompts[e.name]] * len(x)) for e, x in zip(effects, srcs)))
    empty = concat_prompts(*(encode_prompts(pipe, x, [""] * len(x)) for x in srcs))
    torch.manual_seed(seed)  # the LoRA init (peft draws A from the global RNG)
    pipe.transformer.add_adapter(lora_config(rank), adapter_name="fm")
    pipe.transformer.set_adapter("fm")
    fm_train(pipe.transformer, cl.adapter_params(pipe.transformer, "fm"), source, target, ps, empty, steps, 3e-3, seed,
             what="FM baseline" + ("" if teachers is None else " on teacher outputs"))
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    type(pipe).save_lora_weights(tmp, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer, adapter_name="fm"),
                                 transformer_lora_adapter_metadata=pipe.transformer.peft_config["fm"].to_dict())
    os.replace(tmp, folder)
    return folder


@torch.no_grad()
def teacher_outputs(pipe, teachers: Path, e: Effect, images: torch.Tensor, guidance: float, seed: int) -> torch.Tensor:
    """The teacher's 40-step, CFG-g output latents (B, L, 16) on source pictures (B, 3, SIZE, SIZE): one noise per source."""
    pipe.load_lora_weights(str(teachers / e.name), weight_name=f"{e.name}.safetensors", adapter_name="teacher_out")
    pipe.set_adapters(["teacher_out"])
    src = pack(pipe, images)
    noise = torch.randn(src.shape, generator=torch.Generator().manual_seed(seed))
    y = sample_teacher(pipe.transformer, noise, src, encode_prompts(pipe, images, [e.instruction] * len(images)),
                       encode_prompts(pipe, images, [""] * len(images)), teacher_sigmas(pipe.scheduler, 40, src.shape[1]),
                       guidance)
    pipe.delete_adapters("teacher_out")
    return y


def stage_distil(teachers: Path, general: Path, base: Path, out: Path, seed: int, **knobs) -> dict:
    """collectionlora.train on the folders above, exactly as a user would run it."""
    if (out / "lora" / "collectionlora.json").is_file():
        return json.loads((out / "lora" / "collectionlora.json").read_text())
    resume = any((out / "checkpoints").glob("step_*.pt"))  # an interrupted run continues where it stopped
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    cfg = cl.Config(teachers=str(teachers), general=str(general), base=str(base), out=str(out), seed=seed, device="cpu",
                    image_size=SIZE, condition_size=CONDITION, resume=resume, **knobs)
    t0 = time.time()
    lora = cl.train(cfg)
    meta = json.loads((lora / "collectionlora.json").read_text())
    meta["seconds"] = time.time() - t0
    (lora / "collectionlora.json").write_text(json.dumps(meta, indent=2))
    return meta


def stage_lightning(teachers: Path, effect: str, general: Path, base: Path, out: Path, seed: int, steps: int) -> Path:
    """The Lightning LoRA: collectionlora's own distiller with no effect stream (p_switch = 0), so it only
    learns 8-step general editing from the base (teacher = base model) -- our stand-in for a published
    Lightning LoRA. collectionlora wants a --teachers folder: it gets one teacher that is never routed to."""
    if not (out / "lora" / "collectionlora.json").is_file():
        one = out.with_name(out.name + "_teachers")
        if not one.is_dir():
            shutil.copytree(teachers / effect, one / effect)
        stage_distil(one, general, base, out, seed, **(DISTIL_KNOBS | {"p_switch": 0.0, "max_steps": steps, "log_every": 250,
                                                                        "save_every": steps, "lr": 1e-3, "critic_lr": 1e-3,
                                                                        "targets_per_image": 1}))  # as shipped
    return out / "lora"


def save_lora(pipe, folder: Path, layers: dict, rank: int) -> Path:
    """{module: (A (r, in), B (out, r))} with the scale folded into B -> a diffusers LoRA folder (alpha = r)."""
    from peft import LoraConfig
    sd = {f"{m}.lora_{k}.weight": w.contiguous() for m, (A, B) in layers.items() for k, w in (("A", A), ("B", B))}
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(cl.QWEN_TARGET_MODULES))  # what the teachers target
    type(pipe).save_lora_weights(tmp, transformer_lora_layers=sd, transformer_lora_adapter_metadata=config.to_dict())
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def stage_merges(effects: list, teachers: Path, base: Path, folder: Path, density: float = 0.5) -> dict:
    """The three merges of every teacher LoRA that peft's add_weighted_adapter offers (weights 1), each
    written as a LoRA folder: cat (all A and B side by side: exactly the sum of the deltas, rank = the sum
    of the ranks), svd (the summed delta truncated by SVD to the largest teacher rank, peft's default) and
    ties_svd (TIES on the per-teacher deltas -- keep the top `density` by magnitude, elect a sign, mean of
    the agreeing entries -- then the same SVD)."""
    from peft.utils.merge_utils import ties
    out = {m: folder / m for m in ("cat", "svd", "ties")}
    if all((p / "pytorch_lora_weights.safetensors").is_file() for p in out.values()):
        return out
    pipe = load_base(base)
    loras = [cl.read_lora(teachers / e.name / f"{e.name}.safetensors", type(pipe), pipe.transformer) for e in effects]
    rank = max(A.shape[0] for lora in loras for k, A in lora.items() if k.endswith(".A"))
    layers = {m: {} for m in out}
    for module in sorted({k[:-2] for lora in loras for k in lora}):
        As = [lora[module + ".A"] for lora in loras if module + ".A" in lora]
        Bs = [lora[module + ".B"] for lora in loras if module + ".A" in lora]
        layers["cat"][module] = (torch.cat(As), torch.cat(Bs, 1))
        deltas = [B @ A for A, B in zip(As, Bs)]
        for m, delta in (("svd", sum(deltas)), ("ties", ties(deltas, torch.ones(len(deltas)), density))):
            U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
            layers[m][module] = (Vh[:rank], U[:, :rank] * S[:rank])
    ranks = {"cat": len(layers["cat"][module][0]), "svd": rank, "ties": rank}
    for m, folder_m in out.items():
        save_lora(pipe, folder_m, layers[m], ranks[m])
    return out


# ---- Evaluation: everything from here on is measurement ----

def mode_coverage(modes: torch.Tensor, K: int) -> float:
    """Normalised entropy of the variant histogram: 1 = all K variants equally often, 0 = one only."""
    p = torch.bincount(modes, minlength=K).float() / len(modes)
    p = p[p > 0]
    return float(-(p * p.log()).sum() / math.log(K))


@dataclass
class Method:
    """One row of the table: which LoRAs are active for an effect, which prompt it gets, which sampler."""
    adapters: Callable           # effect -> list of adapter names
    prompts: dict | None = None  # effect name -> prompt; None = the effect's own instruction (the teacher's prompt)
    g: float = 0.0               # > 0: the teacher sampler (40 Euler steps, CFG g); 0: the 8-step student sampler


def planned_prompts(teachers: Path, base: Path, seed: int) -> dict:
    """The student prompts collectionlora.train will choose for this folder (its reader, its trigger
    search), so the FM baseline need not wait for the distillation; run() checks they are the same."""
    pipe = cl.load_pipeline(str(base), torch.device("cpu"), torch.float32, seed)
    effects = cl.read_teachers(teachers)
    cl.choose_triggers(pipe, effects, seed)
    return {e.name: e.student_prompt for e in effects}


def one_thread(call) -> None:
    torch.set_num_threads(1)
    call()


def in_parallel(jobs: int, calls: list) -> None:
    """Run independent cached stages in `jobs` forked processes (one torch thread each, like the parent),
    so a 2-core machine trains two things at once; the caller then calls the same stages again and reads
    their caches. Forked, not spawned: the closures and the world's effect functions need no pickling."""
    import multiprocessing
    if jobs <= 1 or len(calls) <= 1:
        for call in calls:
            call()
        return
    ctx, pending, running = multiprocessing.get_context("fork"), list(calls), []
    while pending or running:
        while pending and len(running) < jobs:
            running.append(ctx.Process(target=one_thread, args=(pending.pop(0),)))
            running[-1].start()
        running[0].join(timeout=1.0)
        for proc in [p for p in running if p.exitcode is not None]:
            running.remove(proc)
            if proc.exitcode != 0:
                for p in running:
                    p.terminate()
                raise RuntimeError(f"a parallel stage failed (exit code {proc.exitcode}); its error is printed above -- "
                                   f"rerun to continue from the caches, or pass --jobs 1")


def student_prompts(lora: Path) -> dict:
    return {d["name"]: d["student_prompt"] for d in json.loads((lora / "collectionlora.json").read_text())["effects"]}


def load_all(base: Path, effects: list, teachers: Path, loras: dict):
    """The base with every teacher (adapter name = effect name) and every other LoRA {name: folder} loaded."""
    pipe = load_base(base)
    for e in effects:
        pipe.load_lora_weights(str(teachers / e.name), weight_name=f"{e.name}.safetensors", adapter_name=e.name)
    for name, folder in loras.items():
        pipe.load_lora_weights(str(folder), adapter_name=name)
    return pipe


def run_method(pipe, spec: Method, effect: Effect, noise, src, p: Prompts, empty: Prompts, t_sig, steps: int = 8):
    """(latents, NFE, seconds) of one method on a batch; no adapter = the base model."""
    if names := spec.adapters(effect):
        pipe.enable_lora()
        pipe.set_adapters(names)
    else:
        pipe.disable_lora()
    t = time.time()
    if spec.g:
        x, nfe = sample_teacher(pipe.transformer, noise, src, p, empty, t_sig, spec.g), (len(t_sig) - 1) * (2 if spec.g > 1 else 1)
    else:
        x, nfe = sample_student(pipe.transformer, noise, src, p, steps, torch.Generator().manual_seed(2)), steps
    return x, nfe, time.time() - t


def distances(out: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Mean squared pixel distance of each output to each reference: out (B, ...), refs (M, B, ...) -> (M, B)."""
    return (out[None] - refs).pow(2).flatten(2).mean(2)


def energy_score(out: torch.Tensor, valid: torch.Tensor, seeds: int) -> float | None:
    """The energy score of the samples against the valid outputs, per source, averaged (lower is better; None for 1 seed):
    E|X - Y| - E|X - X'| / 2, X the method's samples, Y uniform over the K valid outputs, |.| the RMS pixel distance. It is a
    proper score for distributions: in expectation it is lowest for samples of the valid outputs in their proportions, so
    a mean where a sample should be (blur, which nearest-valid PSNR, a squared error, rewards) scores worse, and so do a
    blend of the valid outputs and always the same one. out (seeds * n, ...) seed-major, valid (K, n, ...)."""
    if seeds < 2:
        return None
    x, y = out.reshape(seeds, valid.shape[1], -1), valid.flatten(2)  # (S, n, D), (K, n, D)
    rms = lambda a, b: (a[:, None] - b[None]).pow(2).mean(-1).sqrt()  # (A, B, n)
    return float((rms(x, y).mean((0, 1)) - rms(x, x).sum((0, 1)) / (2 * seeds * (seeds - 1))).mean())


@torch.no_grad()
def held_out_samples(world: World, effects: list, pipe, methods: dict, seeds: int):
    """What evaluate() and energy_replicates() measure: every row's samples of every effect on every (held-out source, seed),
    per effect {row: (pixels (seeds * n, 3, H, W) seed-major, NFE, seconds)}. The noise depends on the seed and source only:
    each row, and each effect, gets the same draws."""
    test, n = world.test, len(world.test)
    src = pack(pipe, test)                                   # (n, L, 16)
    rep = lambda t: t.repeat(seeds, *[1] * (t.ndim - 1))  # (n, ...) -> (seeds * n, ...), seed-major
    reps = lambda p: Prompts(rep(p.embeds), rep(p.mask))
    empty, t_sig = reps(encode_prompts(pipe, test, [""] * n)), teacher_sigmas(pipe.scheduler, 40, src.shape[1])
    noise = torch.randn((seeds * n, *src.shape[1:]), generator=torch.Generator().manual_seed(1))
    for e in effects:
        encoded, runs = {}, {}
        for m, spec in methods.items():
            text = e.instruction if spec.prompts is None else spec.prompts[e.name]
            if text not in encoded:
                encoded[text] = reps(encode_prompts(pipe, test, [text] * n))
            x, nfe, secs = run_method(pipe, spec, e, noise, rep(src), encoded[text], empty, t_sig)
            runs[m] = (unpack(pipe, x), nfe, secs)
        yield e, runs


def energy_replicates(world: World, effects: list, pipe, methods: dict, seeds: int) -> dict:
    """The energy score at many seeds, sampled as evaluate() samples (seeds = 4 gives its numbers): {row: {effect: {"pooled": over
    all seeds, "replicates": one 4-seed score per 4 seeds (how far evaluate()'s number moves for the same model; their spread
    gives standard errors), for K > 1 "shares": how often each valid output is the nearest, "imbalance": how unevenly per
    source (total variation from 1/K, averaged over the sources)}}}. examples/energy_noise.py prints it for any rows."""
    n, results = len(world.test), {}
    for e, runs in held_out_samples(world, effects, pipe, methods, seeds):
        valid = torch.stack([unpack(pipe, pack(pipe, torch.stack([e.fn(x, v) for x in world.test]))) for v in range(e.K)])
        for m, (out, _, _) in runs.items():  # valid: (K, n, 3, H, W), after the VAE round trip
            r = {"pooled": energy_score(out, valid, seeds),
                 "replicates": [energy_score(out[g * 4 * n:(g + 1) * 4 * n], valid, 4) for g in range(seeds // 4)]}
            if e.K > 1:
                mode = distances(out, valid.repeat(1, seeds, 1, 1, 1)).min(0).indices.reshape(seeds, n)
                share = torch.stack([(mode == k).float().mean(0) for k in range(e.K)])  # (K, n)
                r |= {"shares": share.mean(1).tolist(), "imbalance": float((share - 1 / e.K).abs().sum(0).mean() / 2)}
            results.setdefault(m, {})[e.name] = r
            log(f"energy at {seeds} seeds, {m} {e.name}: {r['pooled']:.4f}")
    return results


def row_replicates(precise: dict, m: str) -> list:
    """Row m's 4-seed replicates of energy_replicates(), averaged over the effects: the table's number, once per 4 seeds."""
    return [sum(v) / len(v) for v in zip(*(r["replicates"] for r in precise[m].values()))]


def energy_difference(precise: dict, a: str, b: str) -> tuple:
    """(row a's energy - row b's over all seeds, its standard error from the paired 4-seed replicates) of energy_replicates()."""
    mean = lambda v: sum(v) / len(v)
    se = mean_se([x - y for x, y in zip(row_replicates(precise, a), row_replicates(precise, b))])[1]
    return mean([r["pooled"] for r in precise[a].values()]) - mean([r["pooled"] for r in precise[b].values()]), se


def psnr_replicates(world: World, effects: list, pipe, methods: dict, seeds: int, reference: str) -> dict:
    """Nearest-valid PSNR at many seeds, sampled as evaluate() samples (seeds = 4 gives its numbers), each row minus row
    `reference`: {"reference": {effect: its dB}, "per_effect": {row: {effect: row - reference}}, "effect_replicates": {row:
    {effect: one 4-seed difference per 4 seeds}}, "replicates": {row: those averaged over the effects}}. Every row sees the
    same noise, so two rows' replicates pair."""
    per, n = {}, len(world.test)  # row -> effect -> (seeds, n) dB
    for e, runs in held_out_samples(world, effects, pipe, methods, seeds):
        valid = torch.stack([unpack(pipe, pack(pipe, torch.stack([e.fn(x, v) for x in world.test]))) for v in range(e.K)])
        for m, (out, _, _) in runs.items():
            best = distances(out, valid.repeat(1, seeds, 1, 1, 1)).min(0).values  # (seeds * n,), seed-major
            per.setdefault(m, {})[e.name] = (10 * torch.log10(1 / best.clamp_min(1e-10))).reshape(seeds, n)
    rows, gap = [m for m in methods if m != reference], lambda m, k: per[m][k] - per[reference][k]
    each = {m: {k: [float(gap(m, k)[4 * g:4 * g + 4].mean()) for g in range(seeds // 4)] for k in per[m]} for m in rows}
    return {"reference": {k: float(v.mean()) for k, v in per[reference].items()},
            "per_effect": {m: {k: float(gap(m, k).mean()) for k in per[m]} for m in rows}, "effect_replicates": each,
            "replicates": {m: [sum(v) / len(v) for v in zip(*each[m].values())] for m in rows}}


def mean_se(values: list) -> tuple:
    """(mean, standard error of the mean) of replicates; the error is nan for one."""
    mean = sum(values) / len(values)
    return mean, (sum((x - mean) ** 2 for x in values) / (len(values) - 1) / len(values)) ** 0.5 if len(values) > 1 else float("nan")


@torch.no_grad()
def evaluate(world: World, effects: list, pipe, methods: dict, seeds: int, reference: str, quiet: bool = False) -> dict:
    """Every method on every (effect, held-out source, seed); metrics in pixel space (module docstring).
    `reference` is the row the "vs teacher" PSNR compares with."""
    test = world.test
    rt = lambda x: unpack(pipe, pack(pipe, x))  # the VAE round trip: what a perfect latent model outputs
    refs = {e.name: torch.stack([rt(torch.stack([e.fn(x, v) for x in test])) for v in range(e.K)]) for e in effects}  # (K, n, 3, H, W)
    src_rt = rt(test)
    results, pictures = {}, {}
    for e, runs in held_out_samples(world, effects, pipe, methods, seeds):
        own = refs[e.name]                                                        # (K, n, 3, H, W)
        wrong = torch.cat([refs[o.name] for o in effects if o.name != e.name] + [src_rt[None]])  # (M, n, 3, H, W)
        res = {}
        for m, (out, nfe, secs) in runs.items():  # out: (seeds * n, 3, H, W), seed-major
            best, mode = distances(out, own.repeat(1, seeds, 1, 1, 1)).min(0)
            nearest_wrong = distances(out, wrong.repeat(1, seeds, 1, 1, 1)).min(0).values
            res[m] = {"psnr_valid": float((10 * torch.log10(1 / best.clamp_min(1e-10))).mean()),
                      "psnr_vs_teacher": float(psnr(out, runs[reference][0]).mean()),
                      "bad_case": float((nearest_wrong < best).float().mean()),
                      "coverage": mode_coverage(mode, e.K) if e.K > 1 else None, "energy": energy_score(out, own, seeds),
                      "nfe": nfe, "batch_seconds_per_edit": secs / len(out)}
        results[e.name] = res
        pictures[e.name] = {"source": test[0], "valid": own[0, 0], **{m: out[0] for m, (out, _, _) in runs.items()}}
        if not quiet:
            log(f"eval {e.name}: " + " | ".join(f"{m} {r['psnr_valid']:.1f}/{r['bad_case']:.2f}" for m, r in res.items()))
    return {"results": results, "pictures": pictures, "vae_roundtrip_psnr": float(psnr(src_rt, test).mean())}


def evaluate_general(world: World, pipe, students: dict, seeds: int, g: float) -> dict:
    """What PDSR's general stream keeps: its edits asked as written (no trigger), by the base at 40 steps with CFG g (their
    teacher) and at 8, then by each student {row: adapter names}; the rows' means ("summary") and each edit's."""
    base = f"base_40_g{g:g}"
    methods = {base: Method(lambda e: [], None, g), "base_8": Method(lambda e: [])}
    methods |= {m: Method(lambda e, a=a: a) for m, a in students.items()}
    ev = evaluate(world, GENERAL_EFFECTS, pipe, methods, seeds, base, quiet=True)
    return {"summary": summarise(ev["results"], list(methods)), "per_edit": ev["results"]}


@torch.no_grad()
def checkpoint_curve(world: World, effects: list, pipe, out: Path, adapter: str, seeds: int = 2) -> list:
    """Convergence of one distillation: the student of every checkpoint it kept (out/checkpoints; step 0 = the base,
    since the LoRA starts at B = 0) measured on the held-out sources like the table's rows. `adapter` is that run's
    exported LoRA, already loaded into pipe; its weights are overwritten per checkpoint and restored at the end.
    Returns [{"step", "psnr_valid", "bad_case", "coverage", ...}], cached in out/curve.json."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    cache, ckpts = out / "curve.json", sorted((out / "checkpoints").glob("step_*.pt"))
    steps = [0] + [int(c.stem.split("_")[1]) for c in ckpts]
    if cache.is_file() and [p["step"] for p in json.loads(cache.read_text())] == steps:
        return json.loads(cache.read_text())
    final = {k: v.clone() for k, v in get_peft_model_state_dict(pipe.transformer, adapter_name=adapter).items()}
    methods = {"teacher_8": Method(lambda e: [e.name]), "student": Method(lambda e: [adapter], student_prompts(out / "lora"))}
    points = []
    for step, ckpt in zip(steps, [None] + ckpts):
        state = torch.load(ckpt, weights_only=True)["student"] if ckpt else {k: torch.zeros_like(v) for k, v in final.items()}
        set_peft_model_state_dict(pipe.transformer, state, adapter_name=adapter)
        results = evaluate(world, effects, pipe, methods, seeds, "teacher_8", quiet=True)["results"]
        rows = summarise(results, ["student"])
        points.append({"step": step} | rows["student"] | {"per_effect": {e: r["student"]["psnr_valid"] for e, r in results.items()},
                                                           "per_effect_energy": {e: r["student"]["energy"] for e, r in results.items()}})
        log(f"curve {out.name} step {step}: {rows['student']['psnr_valid']:.2f} dB, BCR {rows['student']['bad_case']:.3f}")
    set_peft_model_state_dict(pipe.transformer, final, adapter_name=adapter)
    cache.write_text(json.dumps(points, indent=2))
    return points


COMPOSE = "Please apply {} to the input image, and then apply {}."


@torch.no_grad()
def evaluate_composition(world: World, pairs: list, pipe, methods: dict, seeds: int) -> dict:
    """Zero-shot composition: for each pair (A, B) the prompt COMPOSE.format(prompt_A, prompt_B) in one
    8-step edit; the truth is B(A(source)) (any of K_A x K_B variants). Besides the PSNR to the nearest
    valid composite: how often the output is nearer to an A-only or a B-only valid output than to any
    composite. The row "teachers_chained_16" is what a user does without composition: A's teacher for
    8 steps, then B's teacher on the decoded result for 8 more."""
    test, n = world.test, len(world.test)
    rt = lambda x: unpack(pipe, pack(pipe, x))
    rep = lambda t: t.repeat(seeds, *[1] * (t.ndim - 1))
    src = rep(pack(pipe, test))
    noise = torch.randn(src.shape, generator=torch.Generator().manual_seed(3))
    sources = rep(test)                                                       # (seeds * n, 3, H, W)
    results = {}
    for a, b in pairs:
        valid = torch.stack([rt(torch.stack([b.fn(a.fn(x, va), vb) for x in test])) for va in range(a.K) for vb in range(b.K)])
        a_only = torch.stack([rt(torch.stack([a.fn(x, v) for x in test])) for v in range(a.K)])
        b_only = torch.stack([rt(torch.stack([b.fn(x, v) for x in test])) for v in range(b.K)])
        res = {}
        for m, spec in methods.items():
            if m == "teachers_chained_16":
                first = Method(lambda e: [e.name])
                x, _, _ = run_method(pipe, first, a, noise, src, encode_prompts(pipe, sources, [a.instruction] * len(src)), None, None)
                mid = unpack(pipe, x)
                x, _, _ = run_method(pipe, first, b, noise, pack(pipe, mid), encode_prompts(pipe, mid, [b.instruction] * len(src)),
                                     None, None)
            else:
                pa, pb = (e.instruction if spec.prompts is None else spec.prompts[e.name] for e in (a, b))
                p = encode_prompts(pipe, test, [COMPOSE.format(pa, pb)] * n)
                x, _, _ = run_method(pipe, spec, a, noise, src, Prompts(rep(p.embeds), rep(p.mask)), None, None)
            out = unpack(pipe, x)
            d = {k: distances(out, rep(r.transpose(0, 1)).transpose(0, 1)).min(0).values
                 for k, r in (("valid", valid), ("a", a_only), ("b", b_only))}
            res[m] = {"psnr_valid": float((10 * torch.log10(1 / d["valid"].clamp_min(1e-10))).mean()),
                      "nearer_a_only": float((d["a"] < d["valid"]).float().mean()),
                      "nearer_b_only": float((d["b"] < d["valid"]).float().mean())}
        results[f"{a.name} -> {b.name}"] = res
        log(f"compose {a.name} -> {b.name}: " + " | ".join(f"{m} {r['psnr_valid']:.1f}" for m, r in res.items()))
    return results


@torch.no_grad()
def stock_pipeline_check(base: Path, teachers: Path, student: Path | None, effect: Effect, source: torch.Tensor,
                         g: float, repeats: int = 3) -> dict:
    """The stock pipeline, batch 1: (a) seconds per edit for each method, (b) an oracle for our batched
    sampler -- the same teacher edit (same initial noise) through pipe(...) and through sample_teacher
    must agree to float precision."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    pipe = load_base(base)
    pipe.load_lora_weights(str(teachers / effect.name), weight_name=f"{effect.name}.safetensors", adapter_name="teacher")
    image = to_pil(source)
    teacher_sched, student_sched = pipe.scheduler, cl.student_scheduler(cl.Config())
    x_T = torch.randn(1, LATENT * LATENT // 4, 16, generator=torch.Generator().manual_seed(0))  # (1, L, 16)
    calls = {"teacher_40_cfg": (teacher_sched, lambda: pipe(image=image, prompt=effect.instruction, negative_prompt="",
                                                            true_cfg_scale=g, height=SIZE, width=SIZE, num_inference_steps=40,
                                                            latents=x_T.clone(), output_type="latent").images),
             "teacher_8": (student_sched, lambda: cl.sample(pipe, image, effect.instruction, steps=8, output_type="latent"))}
    out = {}
    with bench_sizes():
        pipe.set_adapters("teacher")
        if student is not None:
            pipe.load_lora_weights(str(student), adapter_name="student")
            prompt = student_prompts(student)[effect.name]
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(student), subfolder="scheduler")
            for steps in (8, 1):  # one step: the edit's fixed cost (encoders, pipeline) plus one transformer call
                calls[f"collectionlora_{steps}"] = (scheduler, lambda n=steps: cl.sample(pipe, image, prompt, steps=n, output_type="latent"))
        for m, (scheduler, call) in calls.items():
            pipe.set_adapters("student" if m.startswith("collectionlora") else "teacher")
            pipe.scheduler = scheduler
            y = call()  # also the warm-up
            t = time.time()
            for _ in range(repeats):
                call()
            out[f"seconds_{m}"] = (time.time() - t) / repeats
            if m == "teacher_40_cfg":
                src = pack(pipe, source[None])
                p, empty = encode_prompts(pipe, source[None], [effect.instruction]), encode_prompts(pipe, source[None], [""])
                ours = sample_teacher(pipe.transformer, x_T, src, p, empty, teacher_sigmas(teacher_sched, 40, src.shape[1]), g)
                out["batched_sampler_max_abs_diff"] = float((ours - y).abs().max())
    return out


def summarise(results: dict, methods: list) -> dict:
    """Average each metric over effects (coverage: over multi-modal effects only)."""
    rows = {}
    for m in methods:
        per = [r[m] for r in results.values() if m in r]
        rows[m] = {k: sum(p[k] for p in per) / len(per) for k in per[0] if k not in ("coverage", "energy", "nfe", "batch_seconds_per_edit")}
        for k in ("coverage", "energy"):  # None where undefined (one output, one seed): averaged over the rest
            rows[m][k] = sum(v) / len(v) if (v := [p[k] for p in per if p.get(k) is not None]) else None
        if "nfe" in per[0]:
            rows[m]["nfe"] = per[0]["nfe"]
    return rows


def markdown_table(rows: dict, extra: dict) -> str:
    lines = ["| method | PSNR to nearest valid (dB) ↑ | PSNR vs teacher (dB) ↑ | mode coverage ↑ | bad-case ratio ↓ | energy score ↓ | NFE | "
             "s / edit (stock pipe, CPU) | adapter bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        cov, energy = ("–" if r.get(k) is None else f"{r[k]:.{d}f}" for k, d in (("coverage", 2), ("energy", 4)))
        x = extra.get(m, {})
        vs_teacher = "reference" if r["psnr_vs_teacher"] >= 99 else f"{r['psnr_vs_teacher']:.2f}"  # the Teacher row itself
        secs = f"{x['seconds']:.3f}" if "seconds" in x else "–"
        lines.append(f"| {m} | {r['psnr_valid']:.2f} | {vs_teacher} | {cov} | {r['bad_case']:.3f} | {energy} | {r['nfe']} | "
                     f"{secs} | {x.get('bytes', '–')} |")
    return "\n".join(lines)


def composition_table(rows: dict) -> str:
    lines = ["| method | PSNR to nearest B(A(x)) (dB) ↑ | nearer to A only ↓ | nearer to B only ↓ |", "|---|---|---|---|"]
    lines += [f"| {m} | {r['psnr_valid']:.2f} | {r['nearer_a_only']:.2f} | {r['nearer_b_only']:.2f} |" for m, r in rows.items()]
    return "\n".join(lines)


def best_rows(rows: dict) -> tuple:
    """The teacher at its best g and the best merge + Lightning (by PSNR): the fair baselines the bars compare with."""
    best = lambda keep: max((m for m in rows if keep(m)), key=lambda m: rows[m]["psnr_valid"])
    return best(lambda m: m.startswith("teacher_40")), best(lambda m: m.startswith("merge_") and m.endswith("+lightning_8"))


def check_bars(rows: dict, general: dict, walls: dict, ablations: list, precise: dict | None = None) -> dict:
    """The goals (issue 11), each as (passed, the numbers it compares). Fidelity: within 2 dB of the teacher's best row
    is the N = 10 goal, within 3 dB the --quick and N = 50 one; part 2's bar, on the energy score (PSNR favours the
    8-step sampler's final x0) measured at many seeds (`precise`, energy_replicates(): at the table's 4 seeds one model's
    score moves by about 0.002, more than the gaps the bar is about), below both rows by more than 2 standard errors;
    an ablation must be worse by more than the noise, on the effects or (`general`: the same metrics on the general
    edits, what PDSR is for) on general editing."""
    teacher, merge = best_rows(rows)
    ours, t, fm_t = rows["collectionlora_8"], rows[teacher], rows["fm_teacher+lightning_8"]
    gap, speed, fixed = t["psnr_valid"] - ours["psnr_valid"], walls["seconds_teacher_40_cfg"] / walls["seconds_collectionlora_8"], ""
    if "seconds_collectionlora_1" in walls:  # 80 against 8 transformer calls make 9x only if the rest of an edit costs <= ~1 call
        step = (walls["seconds_collectionlora_8"] - walls["seconds_collectionlora_1"]) / 7
        cost = walls["seconds_collectionlora_1"] - step  # encoders and pipeline: a 1-step edit less its one call
        fixed = f"; an edit's fixed cost {cost:.3f} s = {cost / step:.1f} student steps (9x needs <= ~1)"
    bars = {"fidelity within 3 dB of the teacher": (gap <= 3, f"{ours['psnr_valid']:.2f} vs {t['psnr_valid']:.2f} ({teacher})"),
            "fidelity within 2 dB of the teacher": (gap <= 2, f"{gap:.2f} dB below"),
            "BCR <= fm_teacher+lightning": (ours["bad_case"] <= fm_t["bad_case"], f"{ours['bad_case']:.3f} vs {fm_t['bad_case']:.3f}"),
            "BCR <= half of the best merge+lightning": (ours["bad_case"] <= 0.5 * rows[merge]["bad_case"],
                                                        f"{ours['bad_case']:.3f} vs {rows[merge]['bad_case']:.3f} ({merge})"),
            ">= 9x less time per edit than the teacher": (speed >= 9, f"{speed:.1f}x" + fixed)}
    if ours["coverage"] is not None:
        bars["mode coverage >= the teacher's - 0.05"] = (ours["coverage"] >= t["coverage"] - 0.05,
                                                         f"{ours['coverage']:.2f} vs {t['coverage']:.2f}")
    if precise and all(m in precise for m in ("collectionlora_8", "teacher_8", "fm_teacher_8")):  # part 2's bar
        d = {m: energy_difference(precise, "collectionlora_8", m) for m in ("teacher_8", "fm_teacher_8")}
        seeds = 4 * len(next(iter(precise["teacher_8"].values()))["replicates"])
        bars[f"energy score ({seeds} seeds) below the teacher's 8 plain steps and FM on its outputs beyond 2 standard errors"] = (
            all(diff < -2 * se for diff, se in d.values()), ", ".join(f"{diff:+.4f} ± {se:.4f} vs {m}" for m, (diff, se) in d.items()))
    for a in ablations:  # worse by more than the noise measured between runs: 1 dB, or 0.1 in coverage or BCR
        r, g, g_ours = rows[a], general[a], general["collectionlora_8"]
        worse = [k for k, w in (("PSNR", r["psnr_valid"] < ours["psnr_valid"] - 1), ("BCR", r["bad_case"] > ours["bad_case"] + 0.1),
                                ("coverage", (r["coverage"] or 0) < (ours["coverage"] or 0) - 0.1),
                                ("general-edit PSNR", g["psnr_valid"] < g_ours["psnr_valid"] - 1),
                                ("general-edit BCR", g["bad_case"] > g_ours["bad_case"] + 0.1)) if w]
        bars[f"{a} worse than the full method by more than the noise"] = (bool(worse), ", ".join(worse) or "not beyond the noise")
    return {k: {"passed": bool(p), "numbers": s} for k, (p, s) in bars.items()}


def save_grid(pictures: dict, columns: list, path: Path, scale: int = 3) -> None:
    """Rows = effects, columns = source, valid output 0 (for K > 1 any of the K is right), then each
    method (held-out source 0, seed 0)."""
    from PIL import Image, ImageDraw
    pad, label_w, head = 2, 150, 26
    cell = SIZE * scale
    W, H = label_w + len(columns) * (cell + pad), head + len(pictures) * (cell + pad)
    grid = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(grid)
    for j, c in enumerate(columns):
        draw.text((label_w + j * (cell + pad), 1), c.replace("+", "\n+"), fill="black")  # e.g. fm / +lightning_8
    for i, (name, pics) in enumerate(pictures.items()):
        y = head + i * (cell + pad)
        draw.text((2, y + cell // 2 - 5), name[:24], fill="black")
        for j, c in enumerate(columns):
            grid.paste(to_pil(pics[c]).resize((cell, cell), Image.NEAREST), (label_w + j * (cell + pad), y))
    grid.save(path)


def plot_lines(series: dict, path: Path, xticks: dict, hlines: dict | None = None) -> Path:
    """Two panels (PSNR to nearest valid, bad-case ratio), drawn with PIL (no plotting package in the requirements):
    series {label: {x: row}} as lines over numeric x, hlines {label: row} as flat lines across, xticks {x: text}."""
    from PIL import Image, ImageDraw
    hlines = hlines or {}
    colours = [(210, 30, 30), (0, 0, 0), (230, 120, 0), (120, 40, 160), (30, 120, 210), (40, 160, 60), (128, 128, 128)]
    labels = list(series) + list(hlines)
    W, H, m = 360, 260, 40
    img = Image.new("RGB", (2 * W, H + 40 + 16 * ((len(labels) - 1) // 4)), "white")
    d = ImageDraw.Draw(img)
    xs = sorted(xticks)
    for panel, (key, title) in enumerate((("psnr_valid", "PSNR to nearest valid (dB)"), ("bad_case", "bad-case ratio"))):
        x0 = panel * W
        vals = [r[key] for p in series.values() for r in p.values()] + [r[key] for r in hlines.values()]
        lo, hi = min(vals), max(vals)
        lo, hi = (lo - 0.05 * (hi - lo + 1e-6), hi + 0.05 * (hi - lo + 1e-6))
        X = lambda x: x0 + m + (W - 2 * m) * (0.5 if len(xs) == 1 else 0.04 + 0.92 * (x - xs[0]) / (xs[-1] - xs[0]))
        Y = lambda v: H - m - (H - 2 * m) * (v - lo) / (hi - lo)
        d.rectangle([x0 + m, m, x0 + W - m, H - m], outline="black")
        d.text((x0 + m, 8), title, fill="black")
        for v in (lo, (lo + hi) / 2, hi):
            d.text((x0 + 2, Y(v) - 5), f"{v:.2f}", fill="black")
        last = -1e9
        for x, text in sorted(xticks.items()):
            if X(x) - last > 6 * len(text) + 4:  # skip a label that would overprint its neighbour
                d.text((X(x) - 3 * len(text), H - m + 4), text, fill="black")
                last = X(x)
        for label, c in zip(labels, colours):
            if label in hlines:
                for a in range(x0 + m, x0 + W - m, 8):  # dashed
                    d.line([(a, Y(hlines[label][key])), (a + 4, Y(hlines[label][key]))], fill=c, width=2)
                continue
            xy = [(X(x), Y(r[key])) for x, r in sorted(series[label].items())]
            if len(xy) > 1:
                d.line(xy, fill=c, width=2)
            for x, y in xy:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=c)
    for i, (label, c) in enumerate(zip(labels, colours)):
        x, y = m + (i % 4) * 170, H + 14 + 16 * (i // 4)
        d.rectangle([x, y, x + 10, y + 10], fill=c)
        d.text((x + 14, y - 2), label, fill="black")
    img.save(path)
    return path


def plot_scaling(root: Path) -> Path | None:
    """Fidelity and BCR vs N from every report under root (one seed), as scaling.png and scaling.md."""
    points = {}  # method -> {N: row}
    for f in sorted(root.glob("*/report/results.json")):
        r = json.loads(f.read_text())
        if "bars" not in r:
            continue
        N, rows = len(r["per_effect"]), r["summary"]
        teacher, merge = best_rows(rows)
        for label, m in (("collectionlora", "collectionlora_8"), ("teacher (best g)", teacher), ("fm+lightning", "fm+lightning_8"),
                         ("fm_teacher+lightning", "fm_teacher+lightning_8"), ("best merge+lightning", merge)):
            if m in rows:
                points.setdefault(label, {})[N] = rows[m]
    if not points:
        return None
    Ns = sorted({N for p in points.values() for N in p})
    lines = ["| method | " + " | ".join(f"N = {N}: PSNR / BCR" for N in Ns) + " |", "|---|" + "---|" * len(Ns)]
    for label, p in points.items():
        lines.append(f"| {label} | " + " | ".join(f"{p[N]['psnr_valid']:.2f} / {p[N]['bad_case']:.3f}" if N in p else "–"
                                                   for N in Ns) + " |")
    (root / "scaling.md").write_text("\n".join(lines) + "\n")
    return plot_lines({label: {Ns.index(N): r for N, r in p.items()} for label, p in points.items()}, root / "scaling.png",
                      {i: f"N={N}" for i, N in enumerate(Ns)})


# ---- The benchmark: a Python function and a CLI ----

QUICK_EFFECTS = ["tint_any", "roll_right_2", "roll_right_3", "invert"]  # multi-modal, a near-neighbour pair, deterministic
# The embedded default (examples/toy/): the quick four plus four that are easy to see at a glance.
TOY_EFFECTS = QUICK_EFFECTS + ["grayscale", "edges", "pixelate", "duotone_any"]
TOY = Path(__file__).resolve().parent / "toy"
# collectionlora knobs for this world: the paper's loop on a CPU-sized schedule, each departure measured in examples/LAB_NOTES.md
# ("Making the student reach its teachers"): rank 64, batch 8, Adam betas (0, 0.99) (the paper's (0.9, 0.999) lost 0.9 dB
# at 1,500 iterations), p_switch 0.8 and route_every 5 (fewer general periods). The warm start at lr 1e-3 (falling to 0),
# then the paper's lr 1e-4: the full objective at 1e-3 undid 1.4-3.0 dB of the warm start's fidelity. Eight teacher targets
# per source (paper: one): with one, the student learnt which hue each training source had, not to pick one, and blended
# tint_any's four hues on new sources (59 % of its outputs nearer their mean than to any; with four: 0 %, +4 dB on it);
# eight instead of four took two draws from energy 0.0608 / 0.0599 to 0.0595 / 0.0596 at 128 seeds, below the teacher's
# 8 steps (0.0601), and the students' tint_any hue imbalance down to the teacher's own 8 steps' (LAB_NOTES.md, session 22).
# After the warm start the student's lr falls to 0 (--lr_decay; paper: constant): on 240 sources per effect, 1,500
# iterations of the full objective then ended at energy 0.0588-0.0604 (three draws), against 0.0618 at a constant lr,
# whose later points swung up to 0.0795 (LAB_NOTES.md: "The recipe change, and what is left on the rolls"). TA-FM at the
# paper's weight 1: w_fm 4 (the bench from 2832bdf to 366c8d9) kept more of a 32-source warm start's fidelity, but was
# not measured on 240 sources. The full phase's lr: 3e-5 since session 26 (paper: 1e-4). After the 48,000-iteration warm
# start, 1,500 iterations at 1e-4 ended three draws at -0.0010 to +0.0003 from the warm start's end (energy, 128 seeds),
# at 3e-5 at -0.0004 to -0.0009, keeping invert's gain without the rolls' loss and 0.2-0.5 dB more PSNR (LAB_NOTES.md,
# session 25). The bench's student: 0.0580 against 0.0588 at 1e-4 (-0.0008 +- 0.0001, 128 seeds; session 26).
DISTIL_KNOBS = {"rank": 64, "alpha": 64, "warmup_lr": 1e-3, "lr": 3e-5, "critic_lr": 1e-4, "beta1": 0.0, "beta2": 0.99,
                "gen_every": 2, "route_every": 5, "p_switch": 0.8, "batch_size": 8, "teacher_steps": 40, "targets_per_image": 8,
                "w_fm": 1.0, "lr_decay": True}
# The warm start (--warmup): 3,000 iterations of flow matching on the teacher outputs per effect, ~40 ms each on CPU.
# Regression gives most of the fidelity at a tenth of the full objective's cost. 1,500 per effect (the bench before
# 8eec73a) ended 0.8 dB lower at N = 4 in two pairs of runs; 3,000 reach FM on teacher outputs (LAB_NOTES.md, "The general
# stream in the warm start").
WARMUP_PER_EFFECT = 3000
# --quick's (240 sources per effect): 6,000. With many sources more iterations generalise (roll_right_3 alone kept improving
# through 12,000, 0.0203 -> 0.0165; on 32 sources 4x the iterations had overfit), and after a 24,000-iteration warm start
# the full method ended at energy 0.0569-0.0606 (mean 0.0587) and 27.21-27.44 dB (four draws) against 0.0588-0.0604 and
# 26.59-26.97 after 12,000 (three; LAB_NOTES.md: "The recipe change", "A third draw", "A fourth draw"). Since session 24:
# 12,000. With eight targets per source, 48,000 then the same 1,500 full iterations ended two draws at energy 0.0588 /
# 0.0586 at 128 seeds, against 0.0596 / 0.0595 after 24,000 (paired: -0.0008 +- 0.0003, -0.0009 +- 0.0002) and
# 0.0013-0.0014 below the teacher's 8 plain steps (LAB_NOTES.md, session 23). About 20 min more of --quick, paid for by
# the batched teacher targets (collectionlora.teacher_target).
QUICK_WARMUP_PER_EFFECT = 12000
# --extend K: per new effect, warm-start and full-objective iterations (a fresh run: 1,500 and 375 per effect, for all)
EXTEND_WARMUP_PER_NEW, EXTEND_FULL_PER_NEW = 2000, 250
# The paper's ablations, each one knob away from the full method (w/o TA-FM: no flow matching on teacher outputs at all),
# and, asked for by name only, DMD alone: neither TS nor TA-FM nor the warm start (issue 11, part 2)
ABLATIONS = {"no_pdsr": {"p_switch": 1.0}, "no_aop": {"aop": False}, "no_ts": {"w_ts": 0.0}, "no_tafm": {"w_fm": 0.0, "warmup": 0},
             "dmd_only": {"w_ts": 0.0, "w_fm": 0.0, "warmup": 0}}
PAPER_ABLATIONS = ["no_pdsr", "no_aop", "no_ts", "no_tafm"]


def export_toy(world: World, base: Path, folder: Path, teacher_steps: int, seed: int, lightning_steps: int, work: Path) -> None:
    """Write the embedded default collection: the trained base (a diffusers folder), one teacher per
    TOY_EFFECTS entry (32 source images each), a general folder and a Lightning LoRA (distilled in
    `work`) -- what the README's main command and `--quick` read."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp / "base")
    effects = [e for e in world.effects if e.name in TOY_EFFECTS]
    stage_teachers(world, effects, base, tmp / "teachers", tmp / "general", teacher_steps, seed)
    lightning = stage_lightning(tmp / "teachers", effects[0].name, tmp / "general", base, work, seed, lightning_steps)
    shutil.copytree(lightning, tmp / "lightning")
    meta = json.loads((tmp / "lightning" / "collectionlora.json").read_text())
    for k in ("teachers", "general", "base", "out"):  # no absolute paths in a committed file
        meta["config"][k] = os.path.relpath(meta["config"][k])
    meta["base"] = os.path.relpath(meta["base"])
    (tmp / "lightning" / "collectionlora.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    log(f"wrote {folder}: base + {len(effects)} teachers + general + lightning, {size / 1e6:.1f} MB")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--effects", type=int, default=50, help="how many effects of the registry (the first N)")
    p.add_argument("--seed", type=int, default=0, help="the world, every model init and every noise draw")
    p.add_argument("--quick", action="store_true", help="the 4 QUICK_EFFECTS with the embedded base, teachers and "
                   "Lightning LoRA (examples/toy), 240 sources per effect, no ablations: about an hour on 2 cores (7,680 teacher "
                   "edits for the distiller, eight per batched call, and as many for FM on teacher outputs; 48,000 warm-start "
                   "iterations)")
    p.add_argument("--root", default="runs/effectbench", help="cache folder for every stage")
    p.add_argument("--base", default="", help="a pre-built base folder instead of training one (--quick: examples/toy/base)")
    p.add_argument("--vae_steps", type=int, default=4000, help="VAE training steps (about 0.16 s each; cached, shared)")
    p.add_argument("--base_steps", type=int, default=2500, help="base pretraining steps (about 0.07 s each; cached, shared)")
    p.add_argument("--teacher_steps", type=int, default=600, help="FM steps per teacher LoRA (about 0.09 s each)")
    p.add_argument("--fm_steps", type=int, default=None, help="FM baselines' steps per effect (default: --teacher_steps, "
                   "what one teacher gets; about 0.17 s each)")
    p.add_argument("--distil_steps", type=int, default=None, help="collectionlora iterations of the full objective, after "
                   "the warm start (default: 1500 per 4 effects)")
    p.add_argument("--warmup_steps", type=int, default=None, help=f"warm-start iterations (flow matching on the teacher "
                   f"outputs alone; default: {QUICK_WARMUP_PER_EFFECT} per effect with --quick, else {WARMUP_PER_EFFECT})")
    p.add_argument("--curve_every", type=int, default=0, help="checkpoint and measure the student every N iterations "
                   "(report/curve.png; 0 = a sixth of the run)")
    p.add_argument("--lightning_steps", type=int, default=1500, help="iterations of the Lightning LoRA (general stream only)")
    p.add_argument("--ablations", nargs="*", choices=list(ABLATIONS), default=None,
                   help="distil these ablations too (no names: the paper's four; default: those four, none with --quick)")
    p.add_argument("--no-ablations", dest="no_ablations", action="store_true", help="distil no ablation")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes for the independent stages (teachers; students, FM, Lightning), one core each")
    p.add_argument("--seeds", type=int, default=4, help="sampling seeds per held-out source")
    p.add_argument("--energy_seeds", type=int, default=64, help="seeds per held-out source for part 2's bar: the energy score of "
                   "collectionlora_8, teacher_8 and fm_teacher_8 with standard errors (a multiple of 4 from 8; 0 = no bar)")
    p.add_argument("--images", type=int, default=None, help=f"source images per effect that the distiller (and the FM "
                   f"baselines) get, each with its teacher targets; the teachers trained on all 256 train sources (default: "
                   f"{QUICK_IMAGES} with --quick, else {IMAGES}: each costs N x 4 teacher edits)")
    p.add_argument("--guidance", type=float, default=1.0, help="teacher CFG g for the real score, the teacher targets and "
                   "the 'vs teacher' reference: these teachers need none (g = 1 and 2 score alike, g = 5 worst), and at g = 1 "
                   "their outputs keep their modes (examples/LAB_NOTES.md)")
    p.add_argument("--extend", type=int, default=0, help="add the next K registry effects to the --effects N student "
                   "(collectionlora --init) and compare with a fresh N+K run; both runs must exist (README, issue 13)")
    p.add_argument("--replay_p", type=float, default=cl.Config.replay_p, help="--extend: the share of effect periods that "
                   "replay the N old teachers (0: no replay, only the general stream protects them)")
    p.add_argument("--export_toy", default="", help="write the embedded default collection (base + 8 teachers + Lightning) "
                   "to this folder and stop")
    return p


def benchmark(effects: dict, seed: int = 0, **options) -> dict:
    """The whole benchmark for any effect set: effects = {name: (instruction, fn)} with fn(image) -> image
    for a deterministic effect, or {name: (instruction, fn, K)} with fn(image, variant) for K valid
    outputs; images are (3, 32, 32) tensors in [0, 1]. options = the CLI's flags (root, teacher_steps,
    distil_steps, ablations, ...). Returns everything results.json holds; stages are cached under root."""
    args = parser().parse_args([])
    for k, v in options.items():
        if not hasattr(args, k):
            raise TypeError(f"benchmark() got an unknown option {k!r} -- one of {sorted(vars(args))}")
        setattr(args, k, v)
    args.seed = seed
    bad = [name for name, s in effects.items() if not (isinstance(s, tuple) and len(s) in (2, 3))]
    if bad:
        raise cl.InputError(f"effect {bad[0]!r} must be (instruction, fn) or (instruction, fn, K) -- see benchmark's docstring")
    spec = {name: s if len(s) == 3 else (s[0], (lambda x, v, fn=s[1]: fn(x)), 1) for name, s in effects.items()}
    return run(spec, args)


def setup(spec: dict, args):
    """world -> base -> teachers (the first stages of run() and extend()): (world, root, base, info, tag, teachers,
    general, toy_base), or None once --export_toy has written the embedded collection."""
    names = list(spec)
    reg = effect_registry()
    root = Path(args.root) / f"seed{args.seed}"
    world = build_world(spec, args.seed)
    check_registry(world.effects, world.test[:8])
    args.images = (QUICK_IMAGES if args.quick else IMAGES) if args.images is None else args.images
    if not 1 <= args.images <= len(world.train) - GENERAL:
        raise cl.InputError(f"--images {args.images}: pass 1 to {len(world.train) - GENERAL} (the train sources not in the general stream)")
    effects = world.effects
    log(f"world: {len(world.train)} train / {len(world.test)} held-out sources, {len(effects)} effects "
        f"({sum(e.K > 1 for e in effects)} multi-modal)")
    embedded = args.quick and not args.base and args.seed == 0 and (TOY / "teachers").is_dir()  # built from seed 0
    base = Path(args.base) if args.base else TOY / "base" if embedded else root / f"base_v{args.vae_steps}_b{args.base_steps}"
    if args.base or embedded:
        if not (base / "model_index.json").is_file():
            raise cl.InputError(f"--base '{base}' is not a diffusers pipeline folder -- pass a folder save_base wrote")
        notes = base / "effectbench_base.json"
        info = json.loads(notes.read_text()) if notes.is_file() else {}
    else:  # the base never depends on the benchmark's effects: always the registry world's general edits
        info = stage_base(build_world(reg, args.seed), base, args.seed, args.vae_steps, args.base_steps)
    log(f"base {base}: {info}")
    if args.export_toy:
        export_toy(build_world({n: reg[n] for n in TOY_EFFECTS}, args.seed), base, Path(args.export_toy), args.teacher_steps,
                   args.seed, args.lightning_steps, root / f"export_lightning_{args.lightning_steps}")
        return None
    registry_prefix = names == list(reg)[: len(names)] and all(spec[n][0] == reg[n][0] for n in names)
    toy_base = base.resolve() == (TOY / "base").resolve()
    tag = ("quick" if args.quick else f"n{len(effects)}") + f"_t{args.teacher_steps}" + ("_toy" if toy_base else "")
    if not (args.quick or registry_prefix):  # a user's effect set: its own cache
        tag += "_" + hashlib.sha1(json.dumps([[n, spec[n][0], spec[n][2]] for n in names]).encode()).hexdigest()[:8]
    teachers, general = root / tag / "teachers", root / tag / "general"
    if embedded and not teachers.is_dir():  # the embedded teachers of the quick four: nothing to train
        for name in names:
            shutil.copytree(TOY / "teachers" / name, teachers / name)
        shutil.copytree(TOY / "general", general)
    in_parallel(args.jobs, [lambda j=j: stage_teachers(world, effects, base, teachers, general, args.teacher_steps,
                                                      args.seed, part=(j, args.jobs)) for j in range(args.jobs)])
    stage_teachers(world, effects, base, teachers, general, args.teacher_steps, args.seed)  # cached by now
    if args.images != IMAGES:  # the distiller's data, not the teachers: a cache of its own
        tag += f"_img{args.images}"
        teachers = with_images(world, teachers, root / tag / "teachers", args.images)
    # the exact user path: the folder is read by collectionlora's own reader
    assert [e.name for e in cl.read_teachers(teachers)] == sorted(names)
    return world, root, base, info, tag, teachers, general, toy_base


def with_images(world: World, teachers: Path, folder: Path, k: int) -> Path:
    """The same teachers with k source images per effect (the distiller's teacher targets): train[0:IMAGES] as stage_teachers
    writes them, then the train sources past the general stream's. The teachers themselves trained on all of train."""
    for effect in sorted(d for d in teachers.iterdir() if d.is_dir()):
        out, tmp = folder / effect.name, folder / (effect.name + ".tmp")
        if (out / "effect.json").is_file():
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        for f in [*effect.glob("*.safetensors"), effect / "effect.json"]:
            shutil.copy(f, tmp / f.name)
        for j, i in enumerate([*range(min(k, IMAGES)), *range(IMAGES + GENERAL, GENERAL + k)]):
            to_pil(world.train[i]).save(tmp / "images" / f"{j}.png")
        os.replace(tmp, out)
    return folder


def distil_plan(n_effects: int, args) -> tuple:
    """(warm-start iterations, all iterations, the folder name) of the distillation of n effects."""
    per_effect = QUICK_WARMUP_PER_EFFECT if args.quick else WARMUP_PER_EFFECT
    warmup = per_effect * n_effects if args.warmup_steps is None else args.warmup_steps
    steps = warmup + (args.distil_steps or 1500 * math.ceil(n_effects / 4))
    # a new lr, K or w_fm: a new run; "gw": the warm start learns the general stream too (collectionlora since c572184)
    k = f"lr{DISTIL_KNOBS['lr']:g}_k{DISTIL_KNOBS['targets_per_image']}_fm{DISTIL_KNOBS['w_fm']:g}_gw"
    k += "_decay" * DISTIL_KNOBS["lr_decay"]  # the lr falling to 0 after the warm start (since session 19)
    return warmup, steps, f"distil_w{warmup}_{steps}_g{args.guidance:g}_{k}"


def run(spec: dict, args) -> dict:
    """world -> base -> teachers -> the students (distil, ablations, Lightning, FM, merges) -> measure -> report."""
    t_start, names = time.time(), list(spec)
    stages = setup(spec, args)
    if stages is None:
        return {}
    world, root, base, info, tag, teachers, general, toy_base = stages
    effects = world.effects

    # the students: CollectionLoRA, its ablations, the Lightning LoRA (general stream only), the FM LoRA, the merges
    warmup, distil_steps, distil_name = distil_plan(len(names), args)
    # a checkpoint per point of the convergence curve, rounded up: 62,500 // 6 put one 4 iterations before the end (session 29)
    every = args.curve_every or max(math.ceil(distil_steps / 6), 1)
    knobs = DISTIL_KNOBS | {"max_steps": distil_steps, "warmup": warmup, "guidance": args.guidance, "log_every": 250,
                            "save_every": every, "keep_checkpoints": distil_steps // every + 1,
                            "cache_dir": str(root / tag / "cache")}  # one cache for all students: each target computed once
    chosen = args.ablations  # None = the default; True / False from benchmark(); [] = all four; or some names
    if args.no_ablations or chosen is False or (chosen is None and args.quick):
        ablations = []
    else:
        ablations = list(PAPER_ABLATIONS) if chosen in (None, True, []) else list(chosen)
    students = {name: (root / tag / (distil_name + ("" if name == "collectionlora" else "_" + name)),
                       knobs | change | {"max_steps": distil_steps - warmup + change.get("warmup", warmup)})  # same full steps
                for name, change in [("collectionlora", {})] + [(a, ABLATIONS[a]) for a in ablations]}
    embedded_lightning = toy_base and (TOY / "lightning").is_dir()  # distilled from that base
    prompts = planned_prompts(teachers, base, args.seed)
    lightning = lambda: stage_lightning(teachers, names[0], general, base, root / f"lightning_{args.lightning_steps}",
                                        args.seed, args.lightning_steps)
    fm_steps, fm_name = (args.fm_steps or args.teacher_steps) * len(effects), "" if args.fm_steps is None else f"_s{args.fm_steps}"
    fm = lambda: stage_fm(world, effects, base, root / tag / f"fm_lora{fm_name}", prompts, DISTIL_KNOBS["rank"], fm_steps, args.seed)
    per_source = DISTIL_KNOBS["targets_per_image"]  # as many teacher outputs per source as the distiller gets
    fm_teacher = lambda: stage_fm(world, effects, base, root / tag / f"fm_teacher_lora_g{args.guidance:g}_k{per_source}{fm_name}",
                                  prompts, DISTIL_KNOBS["rank"], fm_steps, args.seed, teachers, args.guidance, per_source)
    calls = [lambda out=out, kn=kn: stage_distil(teachers, general, base, out, args.seed, **kn) for out, kn in students.values()]
    # collectionlora, the longest, first; the ablations after the FM baselines, so that they find its teacher targets cached
    in_parallel(args.jobs, calls[:1] + [fm, fm_teacher] + calls[1:] + ([] if embedded_lightning else [lightning]))
    for out, kn in students.values():
        stage_distil(teachers, general, base, out, args.seed, **kn)  # cached by now
    loras = {name: out / "lora" for name, (out, kn) in students.items()}
    student = loras["collectionlora"]
    if student_prompts(student) != prompts:
        raise RuntimeError("the FM baseline's prompts differ from the student's -- planned_prompts no longer mirrors "
                           "collectionlora.train's trigger choice; fix it")
    loras["lightning"] = TOY / "lightning" if embedded_lightning else lightning()
    loras["fm_baseline"], loras["fm_teacher"] = fm(), fm_teacher()
    merges = stage_merges(effects, teachers, base, root / tag / "merges")
    loras |= {f"merge_{m}": folder for m, folder in merges.items()}

    # the rows
    own = lambda e: [e.name]
    methods = {f"teacher_40_g{g:g}": Method(own, None, g) for g in (1.0, 2.0, 3.0, 5.0)}
    methods |= {"teacher_8": Method(own), "teacher+lightning_8": Method(lambda e: [e.name, "lightning"]),
                "lightning_8": Method(lambda e: ["lightning"])}
    for m in merges:
        methods[f"merge_{m}_8"] = Method(lambda e, m=m: [f"merge_{m}"])
        methods[f"merge_{m}+lightning_8"] = Method(lambda e, m=m: [f"merge_{m}", "lightning"])
    # (adapter "fm_baseline", not "fm": diffusers' missing-key warning matches adapter names as substrings, e.g. "no_tafm")
    methods |= {"fm_8": Method(lambda e: ["fm_baseline"], prompts),
                "fm+lightning_8": Method(lambda e: ["fm_baseline", "lightning"], prompts),
                "fm_teacher_8": Method(lambda e: ["fm_teacher"], prompts),
                "fm_teacher+lightning_8": Method(lambda e: ["fm_teacher", "lightning"], prompts),
                "collectionlora_8": Method(lambda e: ["collectionlora"], prompts)}
    methods |= {f"{a}_8": Method(lambda e, a=a: [a], student_prompts(loras[a])) for a in ablations}
    reference = f"teacher_40_g{args.guidance:g}"
    pipe = load_all(base, effects, teachers, loras)
    ev = evaluate(world, effects, pipe, methods, args.seeds, reference)
    rows = summarise(ev["results"], list(methods))
    general_edits = evaluate_general(world, pipe, {"lightning_8": ["lightning"], "collectionlora_8": ["collectionlora"]}
                                     | {f"{a}_8": [a] for a in ablations}, args.seeds, args.guidance)
    compose = {}
    if len(effects) > 1:
        pairs = [(effects[i], effects[(i + 1) % len(effects)]) for i in range(min(len(effects), 8))]
        compose_methods = {m: methods[m] for m in ("collectionlora_8", "fm_8", "merge_cat_8")}
        compose_methods["teachers_chained_16"] = None
        compose = evaluate_composition(world, pairs, pipe, compose_methods, args.seeds)
    curve = checkpoint_curve(world, effects, pipe, students["collectionlora"][0], "collectionlora")
    # the paper's teacher (40 steps x 2 for CFG) sets the speed bar, and the oracle checks the CFG path: g >= 2 here
    walls = stock_pipeline_check(base, teachers, student, effects[0], world.test[0], max(args.guidance, 2.0))
    log(f"stock pipeline: {walls}")
    if not walls["batched_sampler_max_abs_diff"] < 1e-4:  # every metric rests on this oracle
        raise RuntimeError(f"the batched sampler differs from pipe(...) by {walls['batched_sampler_max_abs_diff']:.2e} -- "
                           f"the metrics would be wrong; fix sample_teacher / predict_v first")

    # the report
    nbytes = {name: (folder / "pytorch_lora_weights.safetensors").stat().st_size for name, folder in loras.items()}
    nbytes["teachers"] = sum(f.stat().st_size for f in teachers.glob("*/*.safetensors"))
    # bytes to serve all N effects: every teacher file for a teacher row, else the row's one (or two) LoRA files
    extra = {m: {"bytes": sum(nbytes["teachers"] if a in names else nbytes[a] for a in spec_.adapters(effects[0]))}
             for m, spec_ in methods.items()}
    for m in methods:
        if m.startswith("teacher_40") and m != "teacher_40_g1":
            extra[m]["seconds"] = walls["seconds_teacher_40_cfg"]
    extra["teacher_8"]["seconds"] = walls["seconds_teacher_8"]
    extra["collectionlora_8"]["seconds"] = walls["seconds_collectionlora_8"]
    precise = energy_replicates(world, effects, pipe, {m: methods[m] for m in ("teacher_8", "fm_teacher_8", "collectionlora_8")},
                                args.energy_seeds) if args.energy_seeds and args.seeds > 1 else {}
    bars = check_bars(rows, general_edits["summary"], walls, [f"{a}_8" for a in ablations], precise)
    table = markdown_table(rows, extra)
    compose_rows = summarise(compose, list(next(iter(compose.values())))) if compose else {}
    report = root / tag / "report"
    report.mkdir(parents=True, exist_ok=True)
    head = (f"Toy EffectBench, {len(effects)} effects, {len(world.test)} held-out sources x {args.seeds} seeds, "
            f"pixel-space metrics (VAE round trip {ev['vae_roundtrip_psnr']:.2f} dB)")
    text = [head, "", table, ""]
    text += [f"General edits ({len(GENERAL_EFFECTS)} instructions of the general stream, as written; vs teacher = vs the base's "
             f"40 steps; bad case = nearer another general edit or the source):", "", markdown_table(general_edits["summary"], {}), ""]
    if compose_rows:
        text += [f"Zero-shot composition, {len(compose)} ordered pairs (prompt: {COMPOSE!r}):", "", composition_table(compose_rows), ""]
    text += ["The issue's bars:", ""] + [f"- [{'x' if b['passed'] else ' '}] {k}: {b['numbers']}" for k, b in bars.items()]
    print("\n" + "\n".join(text))
    (report / "table.md").write_text("\n".join(text) + "\n")
    result = {"summary": rows, "curve": curve, "per_effect": ev["results"], "composition": {"summary": compose_rows, "per_pair": compose},
              "general_edits": general_edits,
              "bars": bars, "energy_replicates": precise, "wall": walls, "adapter_bytes": nbytes, "vae_roundtrip_psnr": ev["vae_roundtrip_psnr"],
              "base": info, "distil_knobs": knobs, "ablations": {a: ABLATIONS[a] for a in ablations},
              "args": vars(args), "seconds": time.time() - t_start}
    (report / "results.json").write_text(json.dumps(result, indent=2))
    columns = ["source", "valid", reference, "teacher_8", "teacher+lightning_8", best_rows(rows)[1],
               "fm+lightning_8", "fm_teacher+lightning_8", "collectionlora_8"] + [f"{a}_8" for a in ablations]
    save_grid(ev["pictures"], columns, report / "grid.png")
    plot_lines({"collectionlora (2 seeds)": {p["step"]: p for p in curve}}, report / "curve.png",
               {p["step"]: str(p["step"]) for p in curve},
               {m: rows[m] for m in (reference, "teacher_8", "fm_teacher+lightning_8", "fm_teacher_8")})
    plot = plot_scaling(root)
    log(f"wrote {report}/table.md, results.json, grid.png, curve.png{', ' + str(plot) if plot else ''} ({time.time() - t_start:.0f} s in all)")
    return result


def extend(reg: dict, n: int, k: int, args) -> dict:
    """--extend K: the N-effect student learns registry effects N+1 .. N+K in one collectionlora --init run (the N old
    teachers replayed at --replay_p; 0: not at all), measured against the N-effect student before it and a fresh N+K
    distillation (both from earlier runs of this script). The extension reuses the old run's cache (its teachers'
    targets), as a user who kept it would."""
    names = list(reg)[: n + k]
    world, root, base, info, tag, teachers, general, toy_base = setup({m: reg[m] for m in names}, args)
    old_names, new_names = names[:n], names[n:]
    students, metas = {}, {}

    def student(m: int, label: str) -> None:  # the student of an earlier run of this script with --effects m
        students[label] = root / f"n{m}_t{args.teacher_steps}{'_toy' if toy_base else ''}" / distil_plan(m, args)[2] / "lora"
        if not (students[label] / "collectionlora.json").is_file():
            raise cl.InputError(f"--extend {k} needs the {m}-effect student {students[label]} -- run this script with "
                                f"--effects {m} and without --extend first (the same --base, --seed, --guidance)")
        metas[label] = json.loads((students[label] / "collectionlora.json").read_text())
    student(n, "ext_before")
    old_teachers = students["ext_before"].parent.parent / "teachers"  # the files the old student learned from
    for m in old_names:  # the fresh run's teachers must be the same LoRAs (their files' metadata may list sets in any order)
        a, b = (load_file(str(t / m / f"{m}.safetensors")) for t in (old_teachers, teachers))
        if a.keys() != b.keys() or any(not torch.equal(a[x], b[x]) for x in a):
            raise RuntimeError(f"{old_teachers / m} and {teachers / m} differ -- the runs are not comparable")
    work = root / tag / f"extend_{n}+{k}"
    for group, members, folder in (("new", new_names, teachers), ("replay", old_names, old_teachers)):  # links
        for m in members:
            if not (work / group / m).exists():
                (work / group).mkdir(parents=True, exist_ok=True)
                (work / group / m).symlink_to((folder / m).resolve(), target_is_directory=True)
    warmup, steps = EXTEND_WARMUP_PER_NEW * k, (EXTEND_WARMUP_PER_NEW + EXTEND_FULL_PER_NEW) * k
    named = f"lr{DISTIL_KNOBS['lr']:g}_k{DISTIL_KNOBS['targets_per_image']}_fm{DISTIL_KNOBS['w_fm']:g}"  # a new recipe: a new run
    named += "_decay" * DISTIL_KNOBS["lr_decay"]
    out = work / f"w{warmup}_{steps}_g{args.guidance:g}_replay{args.replay_p:g}_{named}"
    knobs = DISTIL_KNOBS | {"max_steps": steps, "warmup": warmup, "guidance": args.guidance, "log_every": 250,
                            "save_every": steps, "init": str(students["ext_before"]), "replay_p": args.replay_p,
                            "replay": str(work / "replay") if args.replay_p > 0 else "",
                            "cache_dir": str(students["ext_before"].parent / "cache")}
    metas["ext_after"] = stage_distil(work / "new", general, base, out, args.seed, **knobs)
    students["ext_after"] = out / "lora"
    student(n + k, "ext_fresh")
    prompts = student_prompts(students["ext_after"])
    if any(prompts[m] != student_prompts(students["ext_before"])[m] for m in old_names):
        raise RuntimeError("the extension changed an old effect's student prompt -- read_init must keep them")

    reference = f"teacher_40_g{args.guidance:g}"
    methods = {reference: Method(lambda e: [e.name], None, args.guidance),
               "before_8": Method(lambda e: ["ext_before"], prompts), "extended_8": Method(lambda e: ["ext_after"], prompts),
               "fresh_8": Method(lambda e: ["ext_fresh"], student_prompts(students["ext_fresh"]))}
    pipe = load_all(base, world.effects, teachers, students)
    ev = evaluate(world, world.effects, pipe, methods, args.seeds, reference)
    rows = {g: summarise({m: ev["results"][m] for m in members}, list(methods)) for g, members in (("old", old_names),
                                                                                                 ("new", new_names))}
    o, w = rows["old"], rows["new"]
    seconds = {"extended_8": metas["ext_after"]["seconds"], "fresh_8": metas["ext_fresh"].get("seconds")}
    goals = {"old effects lose at most 0.5 dB": o["extended_8"]["psnr_valid"] >= o["before_8"]["psnr_valid"] - 0.5,
             "old effects' BCR rises by at most 0.05": o["extended_8"]["bad_case"] <= o["before_8"]["bad_case"] + 0.05,
             "new effects within 1 dB of the fresh run": w["extended_8"]["psnr_valid"] >= w["fresh_8"]["psnr_valid"] - 1,
             "at most a quarter of the fresh run's time": seconds["fresh_8"] is not None and
                                                          seconds["extended_8"] <= seconds["fresh_8"] / 4}
    cell = lambda r: f"{r['psnr_valid']:.2f} | {r['psnr_vs_teacher']:.2f} | {r['bad_case']:.3f}" if r["psnr_vs_teacher"] < 99 \
        else f"{r['psnr_valid']:.2f} | reference | {r['bad_case']:.3f}"
    lines = [f"Extending the {n}-effect student by {k} effects ({', '.join(new_names)}); {args.seeds} seeds x "
             f"{len(world.test)} held-out sources; replay_p {args.replay_p:g}; {warmup} warm-up + {steps - warmup} full "
             f"iterations", "", "| student | old: PSNR valid (dB) | old: vs teacher | old: BCR | new: PSNR valid (dB) | "
             "new: vs teacher | new: BCR | distillation s |", "|---|---|---|---|---|---|---|---|"]
    for m, label in ((reference, "teachers"), ("before_8", f"{n} effects, before"), ("extended_8", f"{n} + {k}, extended"),
                     ("fresh_8", f"{n + k} effects, fresh")):
        new_cell = "– | – | –" if m == "before_8" else cell(w[m])  # the old student never learned the new effects
        secs = f"{seconds[m]:.0f}" if seconds.get(m) else "–"
        lines.append(f"| {label} | {cell(o[m])} | {new_cell} | {secs} |")
    lines += ["", "| effect | group | before | extended | fresh | teacher |", "|---|---|---|---|---|---|"]
    for m in names:
        r = ev["results"][m]
        lines.append(f"| {m} | {'old' if m in old_names else 'new'} | " + " | ".join(
            "–" if (x == "before_8" and m in new_names) else f"{r[x]['psnr_valid']:.2f}"
            for x in ("before_8", "extended_8", "fresh_8", reference)) + " |")
    lines += ["", "Goals (issue 13):", ""] + [f"- [{'x' if ok else ' '}] {g}" for g, ok in goals.items()]
    print("\n" + "\n".join(lines))
    report = work / "report"
    report.mkdir(parents=True, exist_ok=True)
    (report / f"{out.name}.md").write_text("\n".join(lines) + "\n")
    result = {"rows": rows, "per_effect": ev["results"], "seconds": seconds, "goals": goals, "knobs": knobs,
              "old": old_names, "new": new_names}
    (report / f"{out.name}.json").write_text(json.dumps(result, indent=2))
    log(f"wrote {report / out.name}.md and .json")
    return result


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    reg = effect_registry()
    if not args.quick and not 1 <= args.effects <= len(reg):
        print(f"error: --effects {args.effects} is not in 1..{len(reg)} (the registry's size) -- pass at most {len(reg)}", file=sys.stderr)
        return 2
    for flag in ("vae_steps", "base_steps", "teacher_steps", "fm_steps", "distil_steps", "lightning_steps", "seeds"):
        if (value := getattr(args, flag)) is not None and value < 1:  # 0 would fall back to a default (or divide by it)
            print(f"error: --{flag} {value} is below 1 -- pass a positive count, or leave it out for the default", file=sys.stderr)
            return 2
    if args.energy_seeds < 0 or args.energy_seeds % 4 or args.energy_seeds == 4:  # one replicate has no standard error
        print(f"error: --energy_seeds {args.energy_seeds}: pass a multiple of 4 from 8 (each 4 seeds one replicate), or 0 for "
              f"no part-2 bar", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs} is below 1 -- pass the number of processes to use (1 = one at a time)", file=sys.stderr)
        return 2
    if args.extend and (args.quick or not 1 <= args.extend <= len(reg) - args.effects):
        print(f"error: --extend {args.extend} needs --effects N (not --quick) with N + {args.extend} <= {len(reg)} -- "
              f"pass a smaller --extend", file=sys.stderr)
        return 2
    names = QUICK_EFFECTS if args.quick else list(reg)[: args.effects]
    try:
        extend(reg, args.effects, args.extend, args) if args.extend else run({n: reg[n] for n in names}, args)
    except cl.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
