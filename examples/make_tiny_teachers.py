"""Write a tiny `--teachers` folder (and a `--general` folder) for the random tiny base.

    python examples/make_tiny_teachers.py examples/tiny_teachers examples/tiny_general

Each effect is a random LoRA on `collectionlora.build_tiny_pipeline(seed)`'s transformer, saved the
way diffusers saves LoRAs (pytorch_lora_weights format + peft metadata), with mixed ranks and alphas
so the rank-padded teacher slot is exercised. The pictures mean nothing -- the base is random --
but every file is a real input in the documented format. For a meaningful toy world see
examples/effectbench.py.
"""
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
    pipe = cl.build_tiny_pipeline(seed)
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
    make_tiny_teachers(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else None)
