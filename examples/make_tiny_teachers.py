"""Write a tiny `--teachers` folder (and a `--general` folder) for the random tiny base.

    python examples/make_tiny_teachers.py examples/tiny_teachers examples/tiny_general

Each effect is a random LoRA on `build_tiny_pipeline(seed)`'s transformer (below; `--base tiny`), saved the
way diffusers saves LoRAs (pytorch_lora_weights format + peft metadata), with mixed ranks and alphas
so the rank-padded teacher slot is exercised. The pictures mean nothing -- the base is random --
but every file is a real input in the documented format. For a meaningful toy world see
examples/effectbench.py.
"""
import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402

EFFECTS = [  # name, instruction, rank, alpha
    ("warm_glow", "Add a warm golden glow to the image", 4, 2.0),
    ("ink_sketch", "Turn the photo into an ink sketch", 8, 8.0),
    ("neon_edges", "Make the edges glow like neon", 4, 8.0),
]


def build_tiny_pipeline(seed: int = 0, hidden: int = 16):
    """A random QwenImageEditPlusPipeline for CPU tests (~0.2M-param transformer, byte-level tokenizer, 4-channel VAE).
    hidden: the text encoder's width, which is the transformer's joint_attention_dim (a multiple of 8; examples/room_text.py)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from tokenizers import pre_tokenizers
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessorPil
    torch.manual_seed(seed)
    special = "<|endoftext|> <|im_start|> <|im_end|> <|vision_start|> <|vision_end|> <|image_pad|> <|video_pad|>".split()
    vocab = {tok: i for i, tok in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()) + special)}  # one token per byte
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[], extra_special_tokens=special[1:])
    ids = tokenizer.convert_tokens_to_ids
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(  # heads of 8 (mrope_section sums to 4)
        text_config=dict(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=hidden // 8, num_key_value_heads=1, max_position_embeddings=1024,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[1, 1, 2]),
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>")),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=hidden, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))).eval()
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                              num_attention_heads=3, joint_attention_dim=hidden, axes_dims_rope=(8, 4, 4)).eval()
    # A Qwen-Image-like scheduler (dynamic shifting): the teachers' sampler, not the student's.
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                                max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    pipe = QwenImageEditPlusPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                     transformer=transformer, processor=cl.ImageOnlyProcessor(Qwen2VLImageProcessorPil(), tokenizer))
    pipe.register_to_config(processor=cl.STOCK_PROCESSOR)  # so save_pretrained writes a folder load_pipeline reads
    return pipe


def random_image(rng: torch.Generator, size: int = 64) -> Image.Image:
    """A gradient with a coloured rectangle: cheap, varied, deterministic."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    c0, c1, c2 = torch.rand(3, 3, generator=rng)
    img = c0[:, None, None] * xx + c1[:, None, None] * yy + 0.3 * c2[:, None, None]
    x0, y0 = (torch.rand(2, generator=rng) * size * 0.6).long().tolist()
    img[:, y0:y0 + size // 3, x0:x0 + size // 3] = torch.rand(3, 1, 1, generator=rng)
    return Image.fromarray((img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())


def random_lora(pipe, rank: int, alpha: float, seed: int, scale: float = 2.0):
    """A random LoRA of the tiny transformer: (peft state dict, LoraConfig)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(cl.QWEN_TARGET_MODULES), init_lora_weights=False)
    name = f"tmp{seed}"
    pipe.transformer.add_adapter(config, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pipe.transformer.named_parameters():
            if f".{name}." in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale / p.shape[1] ** 0.5)
    sd = {k: v.clone() for k, v in get_peft_model_state_dict(pipe.transformer, adapter_name=name).items()}
    pipe.transformer.delete_adapters(name)
    return sd, config


def make_tiny_teachers(teachers: Path, general: Path | None = None, n_images: int = 2, seed: int = 0,
                       effects=EFFECTS) -> None:
    pipe = build_tiny_pipeline(seed)
    rng = torch.Generator().manual_seed(seed + 1)
    for i, (name, instruction, rank, alpha) in enumerate(effects):
        folder = Path(teachers) / name
        (folder / "images").mkdir(parents=True, exist_ok=True)
        sd, config = random_lora(pipe, rank, alpha, seed=100 + i)
        type(pipe).save_lora_weights(folder, transformer_lora_layers=sd,
                                     transformer_lora_adapter_metadata=config.to_dict(), weight_name=f"{name}.safetensors")
        (folder / "effect.json").write_text(json.dumps({"instruction": instruction}, indent=2))
        for j in range(n_images):
            random_image(rng).save(folder / "images" / f"{j}.png")
    if general is not None:
        Path(general).mkdir(parents=True, exist_ok=True)
        for j, instruction in enumerate(["Make the sky blue", "Brighten the picture", "Remove the red square"]):
            random_image(rng).save(Path(general) / f"{j}.png")
            (Path(general) / f"{j}.txt").write_text(instruction)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("teachers", type=Path, help="the --teachers folder to write (one sub-folder per effect)")
    p.add_argument("general", type=Path, nargs="?", help="optionally, a --general folder to write (3 pictures + instructions)")
    a = p.parse_args()
    make_tiny_teachers(a.teachers, a.general)
