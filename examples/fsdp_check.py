"""FSDP2 against one process and against data parallel, on the CPU (2 gloo processes, the random tiny model): the layout
`collectionlora.py --fsdp` uses (`cl.shard`), run through its training step.

    OMP_NUM_THREADS=1 python examples/fsdp_check.py        # about 1 minute

The layout: `fully_shard` on every transformer block, then on the transformer, with the teacher slot left out of the
sharding (`ignored_params`): every rank swaps its own effect's teacher into its own whole slot, which a sharded slot
would mix with the other ranks' (it is all-gathered before use). The student and the critic LoRAs are sharded, and peft
switches between them (and the teacher and the bare base) by `set_adapter` / `disable_adapters`, as in training.
FSDP2 averages the gradients in its backward, so collectionlora's own averaging (`average_gradients`) leaves sharded
parameters alone.

Three runs of `train_step` (STEPS steps; student every 2nd step, so both kinds of step run):
  1. one process;
  2. FSDP2 on 2 ranks that draw the same effect, sources and noise: must equal run 1 (the mean of two equal gradients);
  3. data parallel (collectionlora's default torchrun mode) and FSDP2 on 2 ranks that train different effects (different
     teachers, sources and targets, so different gradients): must equal each other.
It prints the largest difference of each comparison and exits 1 if one is above the tolerance.

What it found before `--fsdp` was built (README, "One GPU, many GPUs"): under FSDP2 every rank must run the same sequence
of forwards, since each block all-gathers its shards before it runs. The student's backward simulation runs a randomly
drawn number k of forwards; with each rank's own k, FSDP2 waited for ever in a reduce-scatter. collectionlora now takes
rank 0's k on every rank (`on_policy_x0`); the runs here share one generator on both ranks, which gives the same.
"""
import faulthandler
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import collectionlora as cl  # noqa: E402
from make_tiny_teachers import build_tiny_pipeline  # noqa: E402

STEPS = 6
ROOT = Path(__file__).resolve().parent


def trained_loras(rank: int, world: int, out: str, sharded: bool, same_draws: bool, port: int = 0) -> None:
    """Runs STEPS training steps on this rank and saves the full student and critic weights (rank 0) to out."""
    faulthandler.dump_traceback_later(600, exit=True)  # a collective that waits for ever (see the docstring) ends the run
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    with cl.tiny_image_sizes():
        cfg = cl.Config(teachers=str(ROOT / "tiny_teachers"), base="tiny", out=f"{out}/run", cache_dir=f"{out}/cache",
                        rank=4, alpha=4.0, teacher_steps=4, gen_every=2, lr=1e-3, critic_lr=1e-3)
        pipe = build_tiny_pipeline(0)
        bank, data, _ = cl.prepare(pipe, cfg, cl.read_teachers(cfg.teachers), [])
        transformer = pipe.transformer.requires_grad_(False)
        cl.add_trainable_adapters(transformer, cfg)
        if sharded:
            cl.shard(transformer, torch.float32)  # --fsdp's layout
        optimisers = [torch.optim.AdamW(cl.adapter_params(transformer, name), 1e-3) for name in ("student", "critic")]
        gen, sigmas = torch.Generator().manual_seed(0), cl.student_sigmas(8, 3.0)  # one noise stream: see the docstring
        for step in range(STEPS):
            effect = (step + (0 if same_draws else rank)) % len(data.effects)
            bank.swap(effect)
            batch = data.batch(cl.Route("effect", effect, (0,)), "cpu")
            logs = cl.train_step(step, transformer, batch, sigmas, *optimisers, cfg, gen, torch.autocast("cpu", enabled=False))
            assert not logs["skipped"], logs
        weights = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()  # full_tensor: a collective
                   for n, p in transformer.named_parameters() if ".student." in n or ".critic." in n}
        if rank == 0:
            torch.save(weights, f"{out}/{'fsdp' if sharded else 'ddp'}_{world}_{'same' if same_draws else 'own'}.pt")
    if world > 1:
        dist.destroy_process_group()


def two_ranks(out: str, sharded: bool, same_draws: bool) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(trained_loras, args=(2, out, sharded, same_draws, port), nprocs=2)


def largest_difference(out: str, a: str, b: str) -> tuple:
    """(largest |difference| of any student/critic weight, largest |weight|) between two saved runs."""
    x, y = torch.load(f"{out}/{a}.pt"), torch.load(f"{out}/{b}.pt")
    assert x.keys() == y.keys() and any(v.abs().sum() > 0 for k, v in x.items() if "lora_B" in k)  # it trained
    return max((x[k] - y[k]).abs().max().item() for k in x), max(v.abs().max().item() for v in x.values())


def main() -> int:
    out = tempfile.mkdtemp()
    trained_loras(0, 1, out, sharded=False, same_draws=True)
    two_ranks(out, sharded=True, same_draws=True)
    two_ranks(out, sharded=False, same_draws=False)
    two_ranks(out, sharded=True, same_draws=False)
    checks = [("FSDP2, 2 ranks, the same draws == one process", "fsdp_2_same", "ddp_1_same", 1e-6),
              # reduce-scatter and all-reduce add the two ranks' gradients in another order: rounding, amplified by Adam
              ("FSDP2 == data parallel, 2 ranks, each its own effects", "fsdp_2_own", "ddp_2_own", 1e-4)]
    failed = 0
    for what, a, b, tolerance in checks:
        diff, scale = largest_difference(out, a, b)
        failed += diff > tolerance
        print(f"{what}: largest difference of any student/critic weight {diff:.3g} (largest weight {scale:.3g}, "
              f"tolerance {tolerance:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
