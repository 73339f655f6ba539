"""Memory plan for the paper's setting: a rank-128 student LoRA distilled on Qwen-Image-Edit-2509's 20B transformer.

    python examples/bench_memory.py                    # all tables, plus the CPU check on a 0.2B model (~2 min, 1 core)
    python examples/bench_memory.py --out memory.md    # the same, also written to memory.md
    python examples/bench_memory.py --no_check         # arithmetic only (~1 min: the adapters are added on `meta`)
    python examples/bench_memory.py --text_tokens 300 --teacher_rank 32   # other assumptions

What is exact, what is estimated:
  * Parameters are COUNTED, not assumed: the real transformer (diffusers' QwenImageTransformer2DModel with its class
    defaults, which are Qwen-Image's shapes) is built on the `meta` device, the student and critic are added by
    `collectionlora.add_trainable_adapters` itself, the teacher slot by peft as `TeacherBank` adds it. Bytes follow
    from the dtypes those tensors end up with (bf16 base and teacher slot, fp32 student and critic).
  * Activations are a FORMULA read off the forward code (diffusers block, peft LoRA layer, torch autocast rules):
    bytes saved for backward per token per block. The CPU check measures the same quantity on a 0.2B random model
    (torch.autograd.graph.saved_tensors_hooks, unique storages, parameters excluded) in fp32 and in CPU bf16 autocast.
    The CUDA bf16-autocast column differs from the CPU one only where the autocast op lists differ (layer_norm runs
    in fp32 on CUDA, in bf16 on CPU): that column is derived, not measured here.
  * Peaks (graphs alive at once, backward working set, autocast's cast copies, the optimiser step's transient, FSDP2
    all-gather buffers, the 3 GB reserve for the CUDA context and fragmentation) are estimates, each named where used.
    Gradients are not resident: `collectionlora.apply_update` frees an adapter's grads right after its optimiser step
    (zero_grad(set_to_none=True)), so they exist for the ONE adapter being updated, from its backward to the end of its
    step, and count in the peaks, not in the fixed state (the CPU check measures them at the step and 0 bytes after).
    FSDP2 rows are `--fsdp` (the teacher slot stays whole on every GPU); the default torchrun mode is data parallel.
  * Cards: "fits" compares with the total bytes nvidia-smi reports, not the marketing GB: an "80 GB" H100 has 81,559
    MiB (85.52e9 bytes), a "141 GB" H200 143,771 MiB (150.75e9 bytes), less a 3e9-byte reserve. Tables are in GB = 1e9.
  * Not counted: the text encoder and VAE (on the GPU while `prepare` encodes the inputs and computes the teacher
    targets, and during previews; moved to the CPU for training).
"""
import argparse
import ctypes
import datetime
import inspect
import os
import platform
import sys
import time
import types
import warnings
from pathlib import Path

import diffusers
import peft
import torch
import torch.nn.functional as F
from diffusers import QwenImageTransformer2DModel
from peft import LoraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402

GB = 1e9  # every table is in GB = 1e9 bytes
RESERVE = 3e9  # bytes: CUDA context, cuBLAS workspaces, allocator fragmentation: not modelled, kept free
MIB = 2 ** 20
# Card capacities in bytes, the total nvidia-smi reports (an "80 GB" H100: 81,559 MiB = 79.6 GiB = 85.52e9 bytes):
# label (what the table cells say) -> bytes. An A100 80GB reports 81,920 MiB: the H100's 81,559 is the smaller one.
CARDS = {"80": 81_559 * MIB,  # 80 GB card (H100 80GB: 81,559 MiB = 85.52e9 bytes)
         "141": 143_771 * MIB}  # 141 GB card (H200: 143,771 MiB = 150.75e9 bytes)
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
MODES = ("fp32", "cpu-bf16", "cuda-bf16")  # fp32 run (the CPU trainer), bf16 autocast on CPU, bf16 autocast on CUDA

# LoRA'd linears of one block, (in, out) in units of the width d: together they are collectionlora's target list.
LORA_SHAPES = {"to_q": (1, 1), "to_k": (1, 1), "to_v": (1, 1), "to_out.0": (1, 1), "add_q_proj": (1, 1),
               "add_k_proj": (1, 1), "add_v_proj": (1, 1), "to_add_out": (1, 1), "img_mlp.net.0.proj": (1, 4),
               "img_mlp.net.2": (4, 1), "txt_mlp.net.0.proj": (1, 4), "txt_mlp.net.2": (4, 1), "img_mod.1": (1, 6),
               "txt_mod.1": (1, 6)}

# Saved for backward, per token and per block, in bytes per unit of width d; (fp32, cpu-bf16, cuda-bf16). Each token
# is in one stream (image or text); both streams have the same layers. The student's LoRA needs grad, the base does
# not, so a frozen linear saves nothing of its input, and every LoRA-A saves its input.
PER_TOKEN = [
    ("LayerNorm inputs (norm1, norm2)", (8, 4, 8)),  # CUDA autocast runs layer_norm in fp32: an fp32 copy is saved
    ("LayerNorm outputs (kept by the shift/scale modulation)", (8, 4, 8)),
    ("q, k, v LoRA-A input", (4, 6, 6)),  # fp32: one shared tensor; autocast casts it to bf16 once per layer
    ("q, k RMSNorm inputs", (8, 12, 12)),  # bf16: the input and its fp32 copy (`.to(float32).pow(2)`)
    ("joint attention q, k, v, output", (16, 8, 8)),
    ("attention out-projection LoRA-A input", (0, 2, 2)),  # fp32: it is the attention output itself
    ("attention branch output (times gate)", (4, 2, 2)),
    ("MLP-in LoRA-A input", (4, 2, 2)),
    ("GELU input (4d)", (16, 8, 8)),
    ("MLP-out LoRA-A input (4d)", (16, 8, 8)),
    ("MLP branch output (times gate)", (4, 2, 2)),
]
# Per token per block, besides: 6 LoRA-B inputs per stream (rank r each), LayerNorm mean+rstd (2 norms), q/k RMSNorm
# rstd (fp32, H per norm) and the attention log-sum-exp (fp32, H). Per sample per block: the modulation vectors
# (18 d + 2 r elements). Outside the blocks: norm_out's LayerNorm input and the RoPE table of the image tokens.


def elt(mode: str) -> int:
    return 4 if mode == "fp32" else 2


def ln_bytes(mode: str) -> int:
    return 2 if mode == "cpu-bf16" else 4  # bytes per LayerNorm element (fp32 on CUDA autocast)


def per_token_block(d: int, r: int, heads: int, mode: str) -> float:
    """Bytes saved for backward per token per block (the table above and the note below it)."""
    i = MODES.index(mode)
    return (sum(b[i] for _, b in PER_TOKEN) * d + 6 * r * elt(mode) + 2 * 2 * ln_bytes(mode)
            + 2 * heads * 4 + heads * 4)


def forward_activations(c: dict, rank: int, n_img: int, n_txt: int, mode: str, checkpointing: bool) -> dict:
    """Bytes one forward of the student keeps for its backward: {'blocks', 'outside', 'one block', 'total'}.
    Without checkpointing: every block's saved tensors (block 0 saves no LayerNorm-1 input: it needs no grad).
    With diffusers' per-block checkpointing: each block's two input streams (the residual dtype), plus one block's
    saved tensors while it is recomputed in the backward pass (counted by the caller as the working set)."""
    heads, layers, n = c["num_attention_heads"], c["num_layers"], n_img + n_txt
    d = heads * c["attention_head_dim"]
    one_block = n * per_token_block(d, rank, heads, mode) + (18 * d + 2 * rank) * elt(mode)
    outside = (n_img * (d + 2) * ln_bytes(mode)  # norm_out's LayerNorm input, mean, rstd
               + n_img * 4 * c["attention_head_dim"]  # image RoPE table (complex64, head_dim / 2 per token), all blocks
               + 2 * d * elt(mode))  # temb, norm_out's scale
    if checkpointing:
        blocks = layers * n * d * elt(mode)
    else:
        blocks = layers * one_block - n * (d + 2) * ln_bytes(mode)  # block 0 saves no norm1 input, mean, rstd
    return {"blocks": blocks, "outside": outside, "one block": one_block, "total": blocks + outside}


def base_params(c: dict) -> int:
    """QwenImageTransformer2DModel's parameter count, from its modules (checked against the meta build below)."""
    hd = c["attention_head_dim"]
    d, j, p2o = c["num_attention_heads"] * hd, c["joint_attention_dim"], c["patch_size"] ** 2 * c["out_channels"]
    block = (2 * (6 * d * d + 6 * d)  # img_mod, txt_mod
             + 8 * (d * d + d)  # q, k, v, out of both streams
             + 4 * hd  # q/k RMSNorms of both streams
             + 2 * (4 * d * d + 4 * d + 4 * d * d + d))  # both MLPs
    outside = ((256 * d + d) + (d * d + d)  # timestep embedding MLP
               + j + (j * d + d)  # txt_norm, txt_in
               + (c["in_channels"] * d + d)  # img_in
               + (2 * d * d + 2 * d)  # norm_out's modulation
               + (d * p2o + p2o))  # proj_out
    return c["num_layers"] * block + outside


def lora_params(c: dict, rank: int) -> int:
    d = c["num_attention_heads"] * c["attention_head_dim"]
    return c["num_layers"] * rank * d * sum(i + o for i, o in LORA_SHAPES.values())


def lora_params_with_grad(c: dict, rank: int) -> int:
    """The last block's text-stream outputs (to_add_out, txt_mlp) never reach the image output: no grad, no AdamW state."""
    d = c["num_attention_heads"] * c["attention_head_dim"]
    unused = ("to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    return lora_params(c, rank) - rank * d * sum(sum(LORA_SHAPES[m]) for m in unused)


def add_teacher_slot(transformer, rank: int, name: str = "teacher") -> None:
    """The teacher slot exactly as TeacherBank adds it (rank = alpha, frozen), for teachers on the same target list."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(cl.QWEN_TARGET_MODULES),
                                           init_lora_weights=False), adapter_name=name)
    for p in cl.adapter_params(transformer, name):
        p.requires_grad_(False)


def group_params(transformer, adapters) -> dict:
    """{group: (numel, dtype)} for the base and each named adapter."""
    groups = {}
    for n, p in transformer.named_parameters():
        g = next((a for a in adapters if f".{a}." in n), "base")
        groups[g] = (groups.get(g, (0,))[0] + p.numel(), p.dtype)
    return groups


def with_run_adapters(transformer, rank: int, teacher_ranks) -> list:
    """Student and critic by collectionlora itself, teacher slots as TeacherBank adds them; returns the adapter names."""
    cl.add_trainable_adapters(transformer, cl.Config(rank=rank, alpha=float(rank)))
    for r in teacher_ranks:
        add_teacher_slot(transformer, r, f"teacher{r}")
    return ["student", "critic"] + [f"teacher{r}" for r in teacher_ranks]


def count_real_model(rank: int, teacher_ranks) -> dict:
    """{group: (numel, dtype)}: the 20B transformer and the run's adapters counted on `meta`; dtypes from the same
    adapters on a tiny bf16 model on the CPU (as `collectionlora.train` loads the base on CUDA: bf16), because peft
    leaves adapters on `meta` in the default dtype instead of giving them their base layer's dtype."""
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**QWEN_IMAGE).requires_grad_(False)
    counts = group_params(transformer, with_run_adapters(transformer, rank, teacher_ranks))
    tiny = QwenImageTransformer2DModel(num_layers=1, num_attention_heads=1, attention_head_dim=16, in_channels=16,
                                       out_channels=4, joint_attention_dim=16, axes_dims_rope=(4, 6, 6)).to(torch.bfloat16)
    dtypes = group_params(tiny, with_run_adapters(tiny, 2, teacher_ranks))
    return {g: (numel, dtypes[g][1]) for g, (numel, _) in counts.items()}


def nbytes(group: tuple) -> int:
    numel, dtype = group
    return numel * dtype.itemsize


def class_defaults() -> dict:
    sig = inspect.signature(QwenImageTransformer2DModel.__init__)
    return {k: tuple(v.default) if isinstance(v.default, list) else v.default for k, v in sig.parameters.items()
            if k in QWEN_IMAGE}


def tokens(side: int, text_tokens: int) -> tuple:
    """(image tokens, text tokens) of one edit at output side x side: VAE /8 and 2x2 patches = /16 per side; the
    source image's latents are appended at the output size (Qwen-Image-Edit-2509, VAE_IMAGE_SIZE), so x2."""
    return 2 * (side // 16) ** 2, text_tokens


# ---- the CPU check: predicted vs measured on a 0.2B random model ----

def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind these tensors (views and shared tensors counted once)."""
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class SavedTensors:
    """Records every tensor autograd saves for backward (unique storages), per transformer block. The model's own tensors
    (parameters, buffers, tensor attributes such as the RoPE table that text positions are sliced from) are left out."""

    def __init__(self, transformer):
        own = [*transformer.parameters(), *transformer.buffers(),
               *(t for m in transformer.modules() for t in vars(m).values() if torch.is_tensor(t))]
        self.own = {t.untyped_storage().data_ptr() for t in own}
        self.block, self.saved, self.inputs, self.handles = "outside", {}, {}, []
        for i, block in enumerate(transformer.transformer_blocks):
            self.handles.append(block.register_forward_pre_hook(self.entering(i), with_kwargs=True))
            self.handles.append(block.register_forward_hook(lambda *_: setattr(self, "block", "outside")))

    def entering(self, i):
        def hook(module, args, kwargs):
            self.block = i
            flat = [x for a in [*args, *kwargs.values()] for x in (a if isinstance(a, (tuple, list)) else [a])]
            for t in flat:  # what a checkpointed block keeps: its inputs (both streams, temb, the RoPE tables)
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in self.own:
                    self.inputs.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return hook

    def pack(self, t):
        key = t.untyped_storage().data_ptr()
        if key not in self.own:
            self.saved.setdefault(key, (self.block, t.untyped_storage().nbytes()))
        return t

    def bytes_in(self, where) -> int:
        return sum(nb for b, nb in self.saved.values() if b in where)

    def kept_by_checkpointing(self) -> int:
        """Block inputs (which torch's checkpoint also saves outside the blocks) and what is saved outside, once each."""
        return sum(({k: nb for k, (b, nb) in self.saved.items() if b == "outside"} | self.inputs).values())

    def close(self):
        for h in self.handles:
            h.remove()


def random_inputs(c: dict, n_side: int, n_txt: int, dtype, gen):
    """Random encoded inputs of one edit with the fields collectionlora reads (an EditInputs): n_side^2 latent patches."""
    return types.SimpleNamespace(embeds=torch.randn(1, n_txt, c["joint_attention_dim"], generator=gen).to(dtype), mask=None,
                                 image_latents=torch.randn(1, n_side ** 2, c["in_channels"], generator=gen).to(dtype),
                                 img_shapes=[[(1, n_side, n_side), (1, n_side, n_side)]])


def student_forward(transformer, c, n_side: int, n_txt: int, dtype, autocast: bool, gen):
    """One student prediction through collectionlora.predict_v, recording what is saved; returns (v, SavedTensors)."""
    cl.use_adapter(transformer, "student")
    inputs = random_inputs(c, n_side, n_txt, dtype, gen)
    x_t = torch.randn(inputs.image_latents.shape, generator=gen)
    record = SavedTensors(transformer)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(record.pack, lambda t: t):
        v = cl.predict_v(transformer, x_t, torch.tensor(0.7), inputs)
    record.close()
    return v, record


def saved_at_first_backward(transformer, run) -> int:
    """Bytes autograd has saved (unique storages, the model's own tensors excluded) when run() first calls backward."""
    record, seen, backward = SavedTensors(transformer), [], torch.Tensor.backward

    def noting_backward(tensor, *args, **kwargs):
        if not seen:
            seen.append(record.bytes_in(set(range(len(transformer.transformer_blocks))) | {"outside"}))
        return backward(tensor, *args, **kwargs)
    torch.Tensor.backward = noting_backward
    try:
        with torch.autograd.graph.saved_tensors_hooks(record.pack, lambda t: t):
            run()
    finally:
        torch.Tensor.backward = backward
        record.close()
    return seen[0]


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def malloc_bytes() -> int:
    """Bytes the C allocator has handed out and not taken back (glibc mallinfo2: mmapped + heap in use), where torch's
    CPU tensors live. Unlike the RSS it does not depend on whether freed memory went back to the system."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.hblkhd + info.uordblks


def autocast_cache_bytes(numel: int) -> int:
    """Bytes that stay allocated while autocast is on after one no-grad linear with an fp32 weight that requires grad
    (as the critic's LoRA in the student update): torch caches the bf16 copy of such leaf tensors until autocast exits."""
    weight = torch.zeros(numel // 1000, 1000, requires_grad=True)
    x = torch.zeros(1, 1000)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = malloc_bytes()
        torch.nn.functional.linear(x, weight)
        inside = malloc_bytes()
    return inside - before


def check_on_cpu(rank: int, teacher_rank: int, layers: int, heads: int, side: int, n_txt: int) -> tuple:
    """Build a mid-size random transformer (the real one, narrower and shallower), add the run's adapters, run one
    student and one critic step (forward, backward, AdamW) and one collectionlora.train_step, and compare bytes with
    the formulas. Returns (rows: (what, predicted bytes, measured bytes), notes)."""
    c = dict(QWEN_IMAGE, num_layers=layers, num_attention_heads=heads)
    n_side = side // 16  # latent patches per side of one image
    n_img, _ = tokens(side, n_txt)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    transformer = QwenImageTransformer2DModel(**c).requires_grad_(False)
    cfg = cl.Config(rank=rank, alpha=float(rank))
    cl.add_trainable_adapters(transformer, cfg)
    add_teacher_slot(transformer, teacher_rank)
    opts = {a: torch.optim.AdamW(cl.adapter_params(transformer, a), cfg.lr) for a in ("student", "critic")}
    at_step = {}  # grad bytes each adapter holds when its optimiser step starts (apply_update frees them after it)
    hooks = [o.register_step_pre_hook(lambda o, *_, a=a: at_step.update(  # dict.update: the hook must return None
        {a: unique_bytes(p.grad for p in o.param_groups[0]["params"] if p.grad is not None)})) for a, o in opts.items()]
    gen = torch.Generator().manual_seed(0)
    rows = []

    def row(what, predicted, measured):
        rows.append((what, predicted, measured))

    # 1. fp32 student step with the saved tensors recorded, then a critic step (both Adam states exist, as in training)
    v, rec = student_forward(transformer, c, n_side, n_txt, torch.float32, False, gen)
    cl.apply_update(F.mse_loss(v, torch.randn(v.shape, generator=gen)), opts["student"], cfg.grad_clip)
    cl.use_adapter(transformer, "critic")
    v = cl.predict_v(transformer, torch.randn(v.shape, generator=gen), torch.tensor(0.3),
                     random_inputs(c, n_side, n_txt, torch.float32, gen))
    cl.apply_update(F.mse_loss(v, torch.randn(v.shape, generator=gen)), opts["critic"], cfg.grad_clip)
    step_seconds = time.perf_counter() - t0
    for h in hooks:
        h.remove()
    named = dict(transformer.named_parameters())
    of = {a: [p for n, p in named.items() if f".{a}." in n] for a in ("student", "critic", "teacher")}
    base = [p for n, p in named.items() if not any(f".{a}." in n for a in of)]
    row("base weights (fp32 on CPU)", 4 * base_params(c), unique_bytes(base))
    row(f"teacher slot r={teacher_rank}", 4 * lora_params(c, teacher_rank), unique_bytes(of["teacher"]))
    for a in ("student", "critic"):
        n = lora_params_with_grad(c, rank)
        row(f"{a} weights r={rank}", 4 * lora_params(c, rank), unique_bytes(of[a]))
        row(f"{a} grads at its optimiser step", 4 * n, at_step[a])
        row(f"{a} grads after both updates (apply_update frees them: set_to_none)", 0,
            unique_bytes(p.grad for p in of[a] if p.grad is not None))
        row(f"{a} AdamW moments (+ step counters)", 8 * n, unique_bytes(
            s for p in of[a] for s in opts[a].state[p].values() if torch.is_tensor(s)))
    predicted = forward_activations(c, rank, n_img, n_txt, "fp32", False)
    inner = set(range(1, layers))
    row("fp32 activations: one block (mean of blocks 1..L-1)", predicted["one block"], rec.bytes_in(inner) / len(inner))
    row("fp32 activations: one forward, total", predicted["total"], rec.bytes_in(set(range(layers)) | {"outside"}))
    del v, rec

    # 2. one collectionlora.train_step on the effect stream, step 0 (a student update, then a critic update): what the
    # student's loss keeps when its backward starts (DMD on backward simulation, target simulation, TA-FM: 3 graphs)
    batch = types.SimpleNamespace(student=random_inputs(c, n_side, n_txt, torch.float32, gen), teacher_adapter="teacher",
                                  teacher=random_inputs(c, n_side, n_txt, torch.float32, gen),
                                  negative=random_inputs(c, n_side, 8, torch.float32, gen),
                                  target=torch.randn(1, n_side ** 2, c["in_channels"], generator=gen))
    t1 = time.perf_counter()
    saved = saved_at_first_backward(transformer, lambda: cl.train_step(
        0, transformer, batch, cl.student_sigmas(cfg.student_steps, cfg.shift), opts["student"], opts["critic"], cfg, gen,
        torch.autocast("cpu", enabled=False)))
    train_step_seconds = time.perf_counter() - t1
    row("fp32 train_step, student update: saved when its backward starts (3 forwards)", 3 * predicted["total"], saved)

    # 3. the same forward with diffusers' per-block gradient checkpointing: block inputs kept + what is saved outside
    transformer.enable_gradient_checkpointing()
    v, rec = student_forward(transformer, c, n_side, n_txt, torch.float32, False, gen)
    predicted = forward_activations(c, rank, n_img, n_txt, "fp32", True)
    row("fp32 checkpointed forward: block inputs kept + outside", predicted["total"], rec.kept_by_checkpointing())
    transformer.disable_gradient_checkpointing()
    del v, rec, opts

    # 4. bf16 base, fp32 LoRAs (as on CUDA), CPU bf16 autocast: the dtype rules; and autocast's cast cache
    transformer.to(torch.bfloat16)
    for a in ("student", "critic"):
        for p in cl.adapter_params(transformer, a):
            p.data = p.data.float()
    v, rec = student_forward(transformer, c, n_side, n_txt, torch.bfloat16, True, gen)
    predicted = forward_activations(c, rank, n_img, n_txt, "cpu-bf16", False)
    # autocast's bf16 copies of the student's fp32 weights, saved by its linears -- except the modulation LoRA-A's: their
    # input, SiLU(temb), needs no grad (the copies are still made, and cached while autocast is on)
    casts = 2 * (lora_params(c, rank) - layers * 2 * rank * heads * c["attention_head_dim"])
    row("cpu-bf16 activations: one block (mean of blocks 1..L-1)", predicted["one block"] + casts / layers,
        rec.bytes_in(inner) / len(inner))
    row("cpu-bf16 activations: one forward, total (incl. bf16 weight casts)", predicted["total"] + casts,
        rec.bytes_in(set(range(layers)) | {"outside"}))
    del v, rec
    row("autocast cast cache: a no-grad bf16 linear with a 100M fp32 weight that requires grad (bytes still "
        "allocated after it, autocast on; glibc mallinfo2)", 2e8, autocast_cache_bytes(100_000_000))
    seconds = time.perf_counter() - t0
    notes = (f"model: {base_params(c) / 1e6:.1f}M params ({layers} blocks, {heads} heads x {c['attention_head_dim']} = "
             f"width {heads * c['attention_head_dim']}), LoRA r={rank} on the Qwen target list ({lora_params(c, rank) / 1e6:.1f}M each), teacher "
             f"slot r={teacher_rank}; one edit at {side}x{side}: {n_img} image + {n_txt} text tokens; build and fp32 "
             f"student + critic steps {step_seconds:.1f} s, one train_step {train_step_seconds:.1f} s, whole check "
             f"{seconds:.1f} s")
    return rows, notes


# ---- the tables ----

def fmt_gb(x: float) -> str:
    return f"{x / GB:,.2f}"


def fit(total: float) -> str:
    fits = [label for label, capacity in CARDS.items() if total <= capacity - RESERVE]  # bytes against bytes
    return f"{total / GB:,.1f} " + (f"(fits {fits[0]})" if fits else "(no)")


def table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(str(x) for x in r) + " |" for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=128, help="student and critic LoRA rank (alpha = rank), the paper's 128")
    p.add_argument("--teacher_rank", type=int, nargs="+", default=[32, 128],
                   help="teacher slot ranks to count (the slot = the largest teacher rank); the first-GPU table uses the last")
    p.add_argument("--text_tokens", type=int, default=256,
                   help="prompt tokens: the 384^2 condition image (~196 Qwen2.5-VL tokens) + template + instruction")
    p.add_argument("--sides", type=int, nargs="+", default=[512, 1024], help="output image sides")
    p.add_argument("--graphs", type=int, default=3, help="forward graphs alive at the student's backward (effect "
                   "stream: DMD on backward simulation, target simulation, TA-FM)")
    p.add_argument("--no_check", action="store_true", help="skip the CPU measurement")
    p.add_argument("--check_layers", type=int, default=8)
    p.add_argument("--check_heads", type=int, default=6)
    p.add_argument("--check_side", type=int, default=256)
    p.add_argument("--out", help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    out, t_start = [], time.perf_counter()

    def say(text=""):
        print(text, flush=True)
        out.append(text)

    say(f"# Memory plan: CollectionLoRA on Qwen-Image-Edit-2509 (rank {args.rank})\n")
    say(f"{datetime.datetime.now().isoformat(timespec='minutes')} | {platform.platform()} | {platform.machine()} | "
        f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads | torch {torch.__version__}, "
        f"diffusers {diffusers.__version__}, peft {peft.__version__}\n")

    # -- parameters, counted on meta --
    defaults = class_defaults()
    assert defaults == QWEN_IMAGE, f"diffusers' QwenImageTransformer2DModel defaults changed: {defaults}"
    assert set(LORA_SHAPES) == set(cl.QWEN_TARGET_MODULES), "collectionlora's LoRA target list changed"
    c = QWEN_IMAGE
    t0 = time.perf_counter()
    groups = count_real_model(args.rank, args.teacher_rank)
    meta_seconds = time.perf_counter() - t0
    assert groups["base"][0] == base_params(c), (groups["base"][0], base_params(c))
    for name, r in [("student", args.rank), ("critic", args.rank)] + [(f"teacher{r}", r) for r in args.teacher_rank]:
        assert groups[name][0] == lora_params(c, r), (name, groups[name][0], lora_params(c, r))
    say(f"## Parameters (counted on `meta`, {meta_seconds:.0f} s)\n")
    say(f"Transformer config = diffusers {diffusers.__version__} `QwenImageTransformer2DModel` class "
        f"defaults ({', '.join(f'{k}={v}' for k, v in c.items())}); asserted equal here. They give the 20.4B "
        f"transformer of Qwen-Image (diffusers' docs load it as Qwen/QwenImage-20B), which Qwen-Image-Edit-2509 "
        f"fine-tunes with the same shapes -- not checked against the hub's config.json here (no internet). Every count "
        f"below equals the closed-form count in this script.\n")
    rows = [("base transformer", f"{groups['base'][0]:,}", str(groups["base"][1])[6:], fmt_gb(nbytes(groups["base"])))]
    for name in ["student", "critic"] + [f"teacher{r}" for r in args.teacher_rank]:
        label = {"student": f"student LoRA r={args.rank}", "critic": f"critic LoRA r={args.rank}"}.get(
            name, f"teacher slot r={name.removeprefix('teacher')} (TeacherBank)")
        rows.append((label, f"{groups[name][0]:,}", str(groups[name][1])[6:], fmt_gb(nbytes(groups[name]))))
    say(table(["weights", "parameters", "dtype", "GB"], rows))
    say("\nDtypes: those the adapters get on a bf16 base (the CUDA run's base dtype), read off a tiny bf16 model: "
        "peft creates the teacher slot in its base layer's dtype and TeacherBank never casts it; "
        "`add_trainable_adapters` casts student and critic to fp32.\n")

    # -- fixed states --
    n_lora, n_trained = lora_params(c, args.rank), lora_params_with_grad(c, args.rank)
    base_b, teacher_b = nbytes(groups["base"]), nbytes(groups[f"teacher{args.teacher_rank[-1]}"])
    trainable = 2 * (4 * n_lora + 8 * n_trained)  # student + critic: fp32 weights, AdamW exp_avg + exp_avg_sq (no grads)
    fixed = base_b + teacher_b + trainable
    cache = 2 * 2 * n_lora  # autocast's bf16 copies of student and critic: both run inside one autocast region
    grads = 4 * n_trained  # one adapter's fp32 grads: from its backward to the end of its step (apply_update frees them)
    update = 4 * n_trained  # at the step, besides the grads: AdamW's foreach step allocates sqrt(v) for every parameter
    say("## Memory per GPU, one process\n")
    say(table(["state", "GB"], [
        ("base transformer (bf16)", fmt_gb(base_b)),
        (f"teacher slot r={args.teacher_rank[-1]} (bf16)", fmt_gb(teacher_b)),
        ("student + critic fp32 weights", fmt_gb(2 * 4 * n_lora)),
        ("student + critic AdamW moments (fp32, 2 each)", fmt_gb(2 * 8 * n_trained)),
        ("**fixed, all steps** (no grads: apply_update frees an adapter's grads right after its optimiser step)",
         f"**{fmt_gb(fixed)}**"),
        ("while a loss is computed: autocast's bf16 copies of student + critic (cached while autocast is on)", fmt_gb(cache)),
        ("during an update, from its backward to the end of its optimiser step: that ONE adapter's fp32 grads "
         "(torchrun's average_gradients all-reduces and divides them in place)", fmt_gb(grads)),
        ("at the optimiser step, besides the grads: AdamW foreach step, sqrt(v) of the adapter", fmt_gb(update))]))
    say("")

    # -- activations --
    d = c["num_attention_heads"] * c["attention_head_dim"]
    ptb = per_token_block(d, args.rank, c["num_attention_heads"], "cuda-bf16")
    say("## Activations (CUDA bf16 autocast, batch 1 per GPU; formula)\n")
    say(f"Saved for backward per token per block = {ptb:,.0f} bytes at width d={d}, r={args.rank} "
        f"(= {ptb / d:.1f} d; fp32: {per_token_block(d, args.rank, 24, 'fp32') / d:.1f} d, CPU bf16 autocast: "
        f"{per_token_block(d, args.rank, 24, 'cpu-bf16') / d:.1f} d):\n")
    say(table(["saved tensor", "bytes/token/block (fp32, CPU bf16, CUDA bf16) x d"],
              [(w, ", ".join(map(str, b))) for w, b in PER_TOKEN]
              + [("6 LoRA-B inputs (rank r)", "24 r, 12 r, 12 r"), ("LayerNorm mean + rstd", "16, 8, 16 bytes"),
                 ("q/k RMSNorm rstd + attention log-sum-exp (fp32)", "12 H bytes")]))
    say("\nOne forward without checkpointing = L x N x that (+ 18 d + 2 r per block per sample, + norm_out's LayerNorm "
        "input and the image RoPE table). With diffusers' per-block checkpointing (collectionlora's default on CUDA) a "
        "forward keeps L x N x d bf16 (each block's two input streams); the backward recomputes one block at a time. "
        f"N = image tokens (output + source, (side/16)^2 each) + {args.text_tokens} text tokens. The student update on "
        f"the effect stream keeps {args.graphs} forward graphs until its single backward (DMD on backward simulation, "
        "target simulation, TA-FM); the critic update keeps 1. Activation peak of an update = graphs x kept + the "
        f"larger of (a) the cast copies of student + critic ({fmt_gb(cache)} GB) at the end of the loss, (b) during the "
        "backward, the working set (1 block without checkpointing: the activation gradients of the block being "
        "differentiated; 2 with: the recomputed block + its activation gradients) + the student's cast copies its "
        f"graphs still hold ({fmt_gb(cache / 2)} GB, none with checkpointing). No parameter gradients here: the "
        f"adapter's ({fmt_gb(grads)} GB) are added to (b) in the per-GPU peak below (at (a) neither adapter has any). "
        "The no-grad forwards (on-policy sample, teacher, fake score) free their activations block by block: not in "
        "the peak.\n")
    acts, rows = {}, []
    for side in args.sides:
        n_img, n_txt = tokens(side, args.text_tokens)
        full = forward_activations(c, args.rank, n_img, n_txt, "cuda-bf16", False)
        ckpt = forward_activations(c, args.rank, n_img, n_txt, "cuda-bf16", True)

        def phases(graphs, checkpointing):
            """(at the end of the loss: graphs + cast copies, during the backward: graphs + working set), bytes."""
            kept = (ckpt if checkpointing else full)["total"]
            working = (2 if checkpointing else 1) * full["one block"] + (0 if checkpointing else cache / 2)
            return graphs * kept + cache, graphs * kept + working
        acts[side] = {ck: phases(args.graphs, ck) for ck in (True, False)}
        rows.append((f"{side}^2", f"{n_img:,} + {n_txt}", fmt_gb(full["one block"]), fmt_gb(full["total"]),
                     fmt_gb(ckpt["total"]),
                     *(fmt_gb(max(phases(g, ck))) for g in (1, args.graphs) for ck in (False, True))))
    say(table(["output", "tokens img + txt", "one block", "forward (no ckpt)", "forward (ckpt)",
               "critic update peak (no ckpt)", "critic update peak (ckpt)",
               f"student update peak, {args.graphs} graphs (no ckpt)", f"student update peak, {args.graphs} graphs (ckpt)"],
              rows))
    say("\n(GB; the update peaks include the cast copies, not the adapter's grads: those are in the per-GPU peak.)\n")

    # -- per-GPU table --
    block_gather = 2 * (base_b + 2 * 4 * n_lora) / c["num_layers"]  # FSDP2: 2 blocks unsharded (prefetch)

    def per_gpu(k, fsdp, side, ckpt):
        """fixed + the largest of the student update's three moments: the end of its loss (no grads yet), its backward
        (+ all its grads: an upper bound, they fill in as the graphs are freed), its step (grads + sqrt(v), graphs gone)."""
        loss_end, backward = acts[side][ckpt]
        if fsdp:  # base, LoRAs, moments, grads and sqrt(v) sharded 1/K; the teacher slot whole; 2 blocks gathered
            return ((fixed - teacher_b) / k + teacher_b + block_gather
                    + max(loss_end, backward + grads / k, (grads + update) / k))
        return fixed + max(loss_end, backward + grads, grads + update)

    say(f"## Peak memory per GPU (GB = 1e9 bytes; fits N = peak at most card N - {RESERVE / GB:.0f} GB, card 80 = "
        f"{CARDS['80']:,} bytes (H100 80GB: 81,559 MiB), card 141 = {CARDS['141']:,} bytes (H200: 143,771 MiB); "
        f"teacher slot r={args.teacher_rank[-1]})\n")
    header = ["GPUs", "layout"] + [f"{s}^2 {'ckpt' if ck else 'no ckpt'}" for s in args.sides for ck in (True, False)]
    rows = [(k, "FSDP2 (--fsdp)" if fsdp else "data parallel (torchrun)",
             *(fit(per_gpu(k, fsdp, s, ck)) for s in args.sides for ck in (True, False)))
            for fsdp in (False, True) for k in (1, 2, 4, 8) if not (fsdp and k == 1)]
    say(table(header, rows))
    say(f"\nData parallel (collectionlora under torchrun): every GPU holds everything and draws its own edit (global batch "
        f"K); per-GPU memory does not change with K. Peak = fixed + the largest of: the end of the student's loss (its "
        f"graphs + the cast copies, no grads), its backward (graphs + working set + all its grads, {fmt_gb(grads)} GB), "
        f"its AdamW step (grads + sqrt(v), {fmt_gb(grads + update)} GB). FSDP2 (collectionlora --fsdp: fully_shard per "
        f"block + root): base, LoRA weights, grads and AdamW sharded 1/K, the teacher slot whole on every GPU, + 2 "
        f"unsharded blocks ({fmt_gb(block_gather)} GB) for the all-gather and its prefetch; activations and autocast's "
        f"cast copies not sharded (counted as under autocast; --fsdp gathers the LoRAs in bf16, MixedPrecisionPolicy, "
        f"which may drop them).\n")

    # -- shared base vs the official layout --
    rows = []
    for side in args.sides:
        ours = per_gpu(1, False, side, True)
        official = ours + 2 * base_b  # teacher, student and critic each a full bf16 base
        rows.append((f"{side}^2 ckpt, 1 GPU", fit(ours), fit(official), fmt_gb(official - ours)))
        ours8 = per_gpu(8, True, side, True)
        off8 = ours8 + 2 * base_b / 8
        rows.append((f"{side}^2 ckpt, FSDP2 x 8", fit(ours8), fit(off8), fmt_gb(off8 - ours8)))
    say("## One shared base (ours) vs three full models (official: teacher, student and critic each a base)\n")
    say(table(["setting", "ours: 1 base + 3 adapters", "official: 3 bases", "difference"], rows))
    say("\n(Same adapters, optimiser states and activations in both; the official layout adds 2 bf16 bases.)\n")

    # -- CPU check --
    if not args.no_check:
        rows, notes = check_on_cpu(args.rank, args.teacher_rank[0], args.check_layers, args.check_heads,
                                   args.check_side, 64)
        say("## Check: predicted vs measured on a random mid-size model (CPU)\n")
        say(notes + "\n")
        say(table(["quantity", "predicted MB", "measured MB", "measured / predicted"],
                  [(w, f"{pr / 1e6:,.2f}", f"{me / 1e6:,.2f}", f"{me / pr:.4f}" if pr else "both 0" if me == 0 else "NOT 0")
                   for w, pr, me in rows]))
        say("\nMeasured = bytes of unique tensor storages: parameters, `.grad`, optimiser state; for activations "
            "everything autograd saves (saved_tensors_hooks), parameters excluded; with checkpointing, the block "
            "inputs the checkpoint keeps. The CUDA bf16 column above uses the CPU-checked formula with CUDA's "
            "autocast rule for layer_norm (fp32); it is not measured here.\n")
    say(f"(wall time {time.perf_counter() - t_start:.0f} s)")
    if args.out:
        Path(args.out).write_text("\n".join(out) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
