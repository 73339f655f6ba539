"""Resident memory and swap time of the TeacherBank against the number of teachers N (CPU; a benchmark, not a test).

    OMP_NUM_THREADS=1 python examples/bench_teachers.py                      # N = 10, 50, 180; rank-16 teachers
    OMP_NUM_THREADS=1 python examples/bench_teachers.py --n 10 50 --rank 8 --out teachers.md

The claim checked: `collectionlora.TeacherBank` keeps the teachers on disk as memory-mapped safetensors and copies one at
a time into a single `teacher` adapter slot, so (1) a process's resident memory does not grow with N and (2) one swap
costs the same at any N.

For each N, N synthetic teachers are written to a temp dir as real `--teachers` entries (<effect>/{<effect>.safetensors,
effect.json}): random LoRAs of one rank on every QWEN_TARGET_MODULES layer of examples/bench_step.py's `--model mid`
transformer (32M parameters, 6 blocks, width 384), saved as diffusers saves LoRAs. Then two FRESH processes, so that
nothing from an earlier N stays in their memory, each build that pipeline, `read_teachers` the folder and build the bank:
  * the first finds an empty cache, so TeacherBank checks and normalises every LoRA into it ("first build");
  * the second finds them all cached ("cached build": hashing the files and reading the tensor shapes).
The second process must not normalise anything again (a WARNING says if it does): this benchmark found that the cache
tag once hashed diffusers' "_use_default_values", a list in set order that changed with the process's hash seed.
Each process then swaps through every teacher twice (`bank.swap(i)` for i in range(N), twice). Before the first pass
the cached files are dropped from the page cache (fsync + posix_fadvise DONTNEED), so pass 1 reads from disk where the
kernel obliged and pass 2 from the page cache.

The columns, in MB = 2**20 bytes, read from /proc/self/status:
  * RSS (VmRSS) before the bank (pipeline built, folder read), after it is built, after both swap passes; where two
    numbers are given, they are "first-build process / cached-build process";
  * peak: VmHWM since just before the bank was built (reset via /proc/self/clear_refs; "*" marks the whole process's
    peak where the kernel refused the reset);
  * RssFile: the file-backed share of RSS after the swaps (shared libraries, and any mapped teacher file still mapped;
    file pages are shared and reclaimable, anonymous ones are the process's own);
  * swap ms: median / p90 over the N swaps of a pass, in the cached-build process.
Flat columns down the table = the claim holds, up to a few MB of drift: glibc keeps some freed tensor memory (about
10 KB per swap on Linux/glibc 2.36; malloc_trim(0) gives it all back, so it is allocator retention, not live objects).
The teacher files are deleted after each N (--keep keeps them).
"""
import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
import collectionlora as cl  # noqa: E402
from bench_step import build_pipeline, report  # noqa: E402  (the tiny pipeline with the 32M-parameter "mid" transformer)
from make_tiny_teachers import random_lora  # noqa: E402

MB = 2**20


def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in MB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024 / MB  # the kernel writes kB
    return fields


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def drop_from_page_cache(files) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages (the cache was just written) are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_teachers(pipe, folder: Path, n: int, rank: int, seed: int = 0) -> int:
    """N random rank-`rank` LoRAs of pipe.transformer as a --teachers folder; returns the bytes of one LoRA file."""
    template, config = random_lora(pipe, rank, float(rank), seed)  # its keys, shapes and peft config, reused for all
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        name, sub = f"effect_{i:03d}", folder / f"effect_{i:03d}"
        sub.mkdir(parents=True)
        sd = {k: torch.randn(v.shape, generator=g) * 2.0 / v.shape[1] ** 0.5 for k, v in template.items()}
        type(pipe).save_lora_weights(sub, transformer_lora_layers=sd, transformer_lora_adapter_metadata=config.to_dict(),
                                     weight_name=f"{name}.safetensors")
        (sub / "effect.json").write_text(json.dumps({"instruction": f"Apply synthetic effect number {i}"}))
    return (folder / "effect_000" / "effect_000.safetensors").stat().st_size


def child(teachers: str, cache: str) -> None:
    """One measurement in this (fresh) process; prints one line 'RESULT {json}'."""
    pipe = build_pipeline("mid")
    effects = cl.read_teachers(teachers)
    gc.collect()
    m = {"before": proc_status(), "peak_reset": reset_peak()}
    cached = len(list(Path(cache).glob("loras/*.safetensors")))
    t0 = time.perf_counter()
    bank = cl.TeacherBank(effects, pipe, Path(cache))
    m["build_s"] = time.perf_counter() - t0
    m["normalised"] = len(list(Path(cache).glob("loras/*.safetensors"))) - cached  # 0 = every teacher was cached
    gc.collect()
    m["built"] = proc_status()
    drop_from_page_cache(bank.files)
    m["passes"] = []
    for _ in range(2):
        ms = []
        for i in range(len(effects)):  # consecutive indices differ, so every call copies a teacher into the slot
            t0 = time.perf_counter()
            bank.swap(i)
            ms.append(1000 * (time.perf_counter() - t0))
        m["passes"].append(ms)
    gc.collect()
    m["swapped"] = proc_status()
    print("RESULT " + json.dumps(m), flush=True)


def run_child(teachers: Path, cache: Path) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", str(teachers), str(cache)], capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"measuring process failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def p90(values: list) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) > 1 else values[0]


def measure(pipe, n: int, args, tmp: Path, file_size: int) -> dict:
    folder = tmp / f"n{n}"
    t0 = time.perf_counter()
    write_teachers(pipe, folder / "teachers", n, args.rank)
    print(f"[N={n}] wrote {n} teachers ({n * file_size / MB:.0f} MB) in {time.perf_counter() - t0:.0f} s; "
          f"first build ...", flush=True)
    first = run_child(folder / "teachers", folder / "cache")
    print(f"[N={n}] first build {first['build_s']:.1f} s; cached build ...", flush=True)
    cached = run_child(folder / "teachers", folder / "cache")
    if cached["normalised"]:
        print(f"[N={n}] WARNING: the cached build normalised {cached['normalised']} teachers again (cache missed)",
              file=sys.stderr)
    cache_bytes = sum(f.stat().st_size for f in (folder / "cache").rglob("*.safetensors"))
    if not args.keep:
        shutil.rmtree(folder)
    return {"n": n, "first": first, "cached": cached, "cache_mb": cache_bytes / MB}


def table(rows: list, file_size: int) -> str:
    def both(key, field):
        return f"{r['first'][key][field]:.0f} / {r['cached'][key][field]:.0f}"

    def swaps(ms):
        return f"{statistics.median(ms):.1f} / {p90(ms):.1f}"
    lines = ["| N | teacher files MB (each, total + cache) | first build s | cached build s | RSS before bank MB | "
             "RSS after build MB | RSS after all swaps MB | peak MB | RssFile after swaps MB | "
             "swap ms median / p90, pass 1 | pass 2 |", "|---:" * 11 + "|"]
    for r in rows:
        c = r["cached"]
        star = "" if c["peak_reset"] else "*"
        lines.append(f"| {r['n']} | {file_size / MB:.2f}, {r['n'] * file_size / MB:.0f} + {r['cache_mb']:.0f} | "
                     f"{r['first']['build_s']:.1f} | {c['build_s']:.2f} | {both('before', 'VmRSS')} | {both('built', 'VmRSS')} | "
                     f"{both('swapped', 'VmRSS')} | {both('swapped', 'VmHWM')}{star} | {both('swapped', 'RssFile')} | "
                     f"{swaps(c['passes'][0])} | {swaps(c['passes'][1])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, nargs="+", default=[10, 50, 180], help="numbers of teachers")
    p.add_argument("--rank", type=int, default=16, help="rank of every synthetic teacher LoRA")
    p.add_argument("--tmp", default=None, help="folder for the teacher files (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the teacher folders and caches")
    p.add_argument("--out", help="also write the table to this markdown file")
    p.add_argument("--child", nargs=2, metavar=("TEACHERS", "CACHE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(*args.child)
    t_start = time.perf_counter()
    pipe = build_pipeline("mid")
    tmp = Path(tempfile.mkdtemp(prefix="bench_teachers_", dir=args.tmp))
    try:
        file_size = write_teachers(pipe, tmp / "probe", 1, args.rank)
        shutil.rmtree(tmp / "probe")
        free = shutil.disk_usage(tmp).free
        need = {n: int(2.1 * n * file_size) + 64 * MB for n in args.n}  # teachers + their normalised cache copies
        fits, budget = [], free
        for n in args.n:  # with --keep every N's files stay, so they must fit together
            if need[n] <= budget:
                fits.append(n)
                budget -= need[n] if args.keep else 0
            else:
                print(f"skipping N={n}: needs about {need[n] / MB:.0f} MB in '{tmp}', {budget / MB:.0f} MB free "
                      f"-- make room or pass --tmp on another disk", file=sys.stderr)
        if not fits:
            sys.exit("no N fits on the disk: nothing measured")
        print(f"teacher files: {file_size / MB:.2f} MB each (rank {args.rank}); the largest N needs about "
              f"{max(need[n] for n in fits) / MB:.0f} MB in '{tmp}' ({free / MB:.0f} MB free)", flush=True)
        rows = [measure(pipe, n, args, tmp, file_size) for n in fits]
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    report("Teacher bank: memory and swap time against N", f"rank-{args.rank} teachers on the 32M-parameter mid transformer",
           t_start, f"{table(rows, file_size)}\n\nTwo numbers = first-build process / cached-build process; swap times "
           "from the cached-build process.", args.out)


if __name__ == "__main__":
    main()
