"""The paper's objective from a cold start against the bench's warm start, on N = 10 (sessions 38-39).

Every bench recipe begins with a warm start (`--warmup`: flow matching alone on the teachers' outputs, the student every
step, lr 1e-3 falling to 0); the paper, and the CLI's defaults, have none (`--warmup 0`, constant lr 1e-4). Which of
the warm start's differences makes it reach the teachers? Each run below is one change from another.

    python examples/cold_start.py cold                 # the paper's objective, constant lr 1e-4, 15,000 iterations (session 38)
    python examples/cold_start.py cold fm_full         # one change: TA-FM's t ~ U[0, 1000) shifted, not U[t_dmd, 1000) (same draws)
    python examples/cold_start.py cold lr1e-3          # one change: lr 1e-3
    python examples/cold_start.py cold long            # the first run continued to the paper's 25,000 (its checkpoints copied)
    python examples/cold_start.py cold decay           # one change: lr 1e-3 falling to 0 at 15,000 (the warm start's; session 39)
    python examples/cold_start.py cold decay_fm_full   # the same from the fm_full run
    python examples/cold_start.py cold decay_fm_full_no_ts   # and from that one, no target simulation (--w_ts 0)
    python examples/cold_start.py cold decay_no_ts     # lr 1e-3 falling, --w_ts 0, TA-FM as the paper: CLI flags alone (session 40)
    python examples/cold_start.py cold decay_fm_full_no_ts_dmd2   # decay_fm_full_no_ts with the DMD term weighted 2 (session 40)
    python examples/cold_start.py cold decay_fm_full_ts0          # decay_fm_full with TS's timestep over [0, 1000): --ts_t_min 0
    python examples/cold_start.py cold decay_fm_full_critic_ts    # decay_fm_full, the critic also learns TS's samples (session 41)
    python examples/cold_start.py cold decay_fm_full_ts0_critic_ts   # both changes at once
    python examples/cold_start.py fm fall1e-3          # flow matching alone: the bench's own warm start, 12,000 iterations
    python examples/cold_start.py fm fall1e-4          # ... lr 1e-4 falling to 0; const1e-4, const1e-3: a constant lr
    python examples/cold_start.py fm fall1e-3_7500     # the warm start in 7,500: as many student updates as 15,000 cold iterations
    python examples/cold_start.py at fm_const1e-4 7500  # a row from a run's checkpoint (a constant lr: that run stopped there)
    python examples/cold_start.py curve FOLDER         # every checkpoint of a run, 16 held-out sources x 4 seeds
    python examples/cold_start.py measure ROW ...      # rows against the 40-step teacher, 16 seeds, held-out and training
                                                       # sources: runs/n10/cold_<rows>.json (paired: every call draws the same noise)

The world is the bench's N = 10 world on the toy base (runs/n10: the effectbench.py command in examples/room_width.py's
docstring builds it): 64 sources per effect, eight teacher targets each. Every run has the bench's knobs (batch 8,
`gen_every 2`, beta1 0, beta2 0.99, p_switch 0.8, rank 64, CFG 1), the router's period 1 and seed 0. A flow-matching run
is a warm start alone: `--warmup 12000` ends it at its last step; a constant lr is a warm start that never ends
(`--warmup 10**9`: its lr falls by 1.2e-5 of itself in 12,000 steps). The run `fm fall1e-3` is the bench student `warm`'s
first 12,000 iterations, loss for loss (its log.jsonl equals that run's).
"""
import json
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import effectbench as eb  # noqa: E402
import room_width as rw  # noqa: E402

COLD = {"": ("cold_15000_lr1e-4_const", {}), "fm_full": ("cold_15000_lr1e-4_const_fm_full", {}),  # session 38, constant lr
        "lr1e-3": ("cold_15000_lr1e-4_const_lr1e-3", {"lr": 1e-3}), "long": ("cold_25000_lr1e-4_const", {"max_steps": 25000}),
        "decay": ("cold_15000_lr1e-3_decay", {"lr": 1e-3, "lr_decay": True}),  # session 39
        "decay_fm_full": ("cold_15000_lr1e-3_decay_fm_full", {"lr": 1e-3, "lr_decay": True}),
        "decay_fm_full_no_ts": ("cold_15000_lr1e-3_decay_fm_full_no_ts", {"lr": 1e-3, "lr_decay": True, "w_ts": 0.0}),
        "decay_no_ts": ("cold_15000_lr1e-3_decay_no_ts", {"lr": 1e-3, "lr_decay": True, "w_ts": 0.0}),  # session 40: flags alone
        "decay_fm_full_no_ts_dmd2": ("cold_15000_lr1e-3_decay_fm_full_no_ts_dmd2", {"lr": 1e-3, "lr_decay": True, "w_ts": 0.0}),
        "decay_fm_full_ts0": ("cold_15000_lr1e-3_decay_fm_full_ts0", {"lr": 1e-3, "lr_decay": True, "ts_t_min": 0.0}),  # session 41
        "decay_fm_full_critic_ts": ("cold_15000_lr1e-3_decay_fm_full_critic_ts", {"lr": 1e-3, "lr_decay": True}),
        "decay_fm_full_ts0_critic_ts": ("cold_15000_lr1e-3_decay_fm_full_ts0_critic_ts", {"lr": 1e-3, "lr_decay": True, "ts_t_min": 0.0})}
FM = {"fall1e-3": (12000, 1e-3), "fall1e-4": (12000, 1e-4), "const1e-4": (10**9, 1e-4), "const1e-3": (10**9, 1e-3),
      "fall1e-3_7500": (7500, 1e-3)}  # (--warmup, --warmup_lr); max_steps min(warmup, 12,000)
ROWS = {"warm": "distil_w12000_12500_g1_lr3e-05_k8_fm1_gw_decay_route1"} | {
    "cold" + (f"_{v}" if v else ""): d for v, (d, _) in COLD.items()} | {f"fm_{v}": f"fmonly_{v}" for v in FM}


def full_range_fm() -> None:
    """The student's flow matching (TA-FM) over every timestep (its draws otherwise the same); the critic's already is."""
    fm = eb.cl.flow_matching_term
    eb.cl.flow_matching_term = lambda tr, adapter, x0, c, t_min, cfg, gen: fm(tr, adapter, x0, c, 0.0 if adapter == "student" else t_min, cfg, gen)


def double_dmd() -> None:
    """The DMD term weighted 2 (no flag has it): as much weight on the critic's score as DMD and TS together, without TS."""
    student_loss = eb.cl.student_loss

    def doubled(*args) -> dict:
        losses = student_loss(*args)
        return losses | {"dmd": 2 * losses["dmd"]}
    eb.cl.student_loss = doubled


def critic_on_ts() -> None:
    """The critic also learns the samples the TS term is applied to (the student's x0 from a noised teacher output, drawn as
    student_loss draws them), beside its own: each DMD term's fake score then comes from its own samples (no flag has it)."""
    cl, critic_loss = eb.cl, eb.cl.critic_loss

    def both(transformer, b, sigmas, cfg, gen):
        loss = critic_loss(transformer, b, sigmas, cfg, gen)
        if b.teacher_adapter and b.target is not None:  # the effect stream with teacher outputs: where TS is applied
            with torch.no_grad():
                j = int(torch.randint(len(sigmas) - cfg.ts_last_k, len(sigmas), (), generator=gen, device=gen.device))
                x_j = cl.add_noise(b.target, torch.randn(b.target.shape, generator=gen, device=gen.device), sigmas[j])
                cl.use_adapter(transformer, "student")
                x0_ts = cl.x0_from_v(x_j, cl.predict_v(transformer, x_j, sigmas[j], b.student), sigmas[j])
            loss = loss + cl.flow_matching_term(transformer, "critic", x0_ts, b.student, 0.0, cfg, gen)
        return loss
    cl.critic_loss = both


def cold(variant: str) -> None:
    w = rw.world_of(64)
    if "fm_full" in variant:
        full_range_fm()
    if "dmd2" in variant:
        double_dmd()
    if "critic_ts" in variant:
        critic_on_ts()
    knobs = rw.knobs(10, w["cache"], per_warm=0, per_full=1500)[1] | {
        "lr": 1e-4, "lr_decay": False, "route_every": 1, "save_every": 2500, "keep_checkpoints": 11} | COLD[variant][1]
    out = w["home"] / COLD[variant][0]
    if variant == "long" and not out.is_dir():  # constant lr, router and noise from (seed, step) and the checkpoint: the longer run
        shutil.copytree(w["home"] / COLD[""][0] / "checkpoints", out / "checkpoints")
    print(eb.stage_distil(w["teachers"], w["general"], w["base"], out, 0, **knobs).get("seconds"))


def fm(variant: str) -> None:
    w, (warmup, lr) = rw.world_of(64), FM[variant]
    knobs = rw.knobs(10, w["cache"])[1] | {"warmup": warmup, "warmup_lr": lr, "max_steps": min(warmup, 12000), "route_every": 1,
                                           "save_every": 1500, "keep_checkpoints": 9}
    print(eb.stage_distil(w["teachers"], w["general"], w["base"], w["home"] / f"fmonly_{variant}", 0, **knobs).get("seconds"))


def at(row: str, step: int) -> None:
    """Row <row>_<step>: the run's export with the student of its checkpoint at `step` (the export is its last one's)."""
    from safetensors.torch import load_file, save_file
    home = rw.world_of(64)["home"]
    lora, out = home / ROWS[row] / "lora", home / f"{ROWS[row]}_{step}" / "lora"
    state = torch.load(home / ROWS[row] / "checkpoints" / f"step_{step:08d}.pt", weights_only=True)["student"]
    exported = load_file(str(lora / "pytorch_lora_weights.safetensors"))
    assert exported.keys() == {"transformer." + k for k in state}, "the export's keys are the checkpoint's, prefixed"
    shutil.copytree(lora, out, dirs_exist_ok=True)  # its prompts and config; the weights replaced
    save_file({"transformer." + k: v.contiguous() for k, v in state.items()}, str(out / "pytorch_lora_weights.safetensors"))
    print(f"wrote {out}")


def curve(folder: str) -> None:
    w = rw.world_of(64)
    out, world = w["home"] / folder, eb.build_world({k: eb.effect_registry()[k] for k in rw.NAMES}, 0)
    pipe = eb.load_all(w["base"], world.effects, w["teachers"], {"collectionlora": out / "lora"})
    for p in eb.checkpoint_curve(world, world.effects, pipe, out, "collectionlora", seeds=4):
        print(p["step"], round(p["psnr_valid"], 2), round(p["coverage"] or 0, 2), round(p["bad_case"], 3),
              {k: round(v, 2) for k, v in p["per_effect"].items()}, flush=True)


def measure(rows: list) -> None:
    w = rw.world_of(64)
    dirs = lambda r: ROWS[r] if r in ROWS else f"{ROWS[r.rsplit('_', 1)[0]]}_{r.rsplit('_', 1)[1]}"  # at's rows: <row>_<step>
    loras = {r.replace("-", "_"): w["home"] / dirs(r) / "lora" for r in rows}  # a row's name is its adapter's: no "-"
    result = rw.measure_rows(w["base"], w["teachers"], rw.NAMES, loras, 16)
    for where, r in result.items():
        print(f"{where}: row - 40-step teacher (CFG 1), all 10 effects, 16 seeds", flush=True)
        for m, v in r["replicates"].items():
            print(f"  {m:16s} {'%+.2f +- %.2f' % eb.mean_se(v)} (replicates " + " ".join(f"{x:+.2f}" for x in v) + ")"
                  + "".join(f"  {k} {x:+.2f}" for k, x in r["per_effect"][m].items()), flush=True)
    (w["home"].parent.parent / f"cold_{'_'.join(rows)}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    torch.set_num_threads(1)
    what, args = sys.argv[1], sys.argv[2:]
    if what == "cold":
        cold(args[0] if args else "")
    elif what == "fm":
        fm(args[0])
    elif what == "at":
        at(args[0], int(args[1]))
    elif what == "curve":
        curve(args[0])
    elif what == "measure":
        measure(args)
    else:
        sys.exit(f"unknown command {what!r} -- see the docstring of examples/cold_start.py: cold, fm, at, curve or measure")
