"""Epoch time of one training run in 1, 2, ... processes (torch's launcher, `torchrun`), as JSON: each process count
trains the same config, and the epochs' own timings (metrics.jsonl) give the seconds per epoch; the LoRAs are
compared to the one-process LoRA.

    python bench/bench_scaling.py                                   # the default toy run, 4 epochs, 1 and 2 processes
    python bench/bench_scaling.py --processes 1,2,4,8 -- --model runwayml/stable-diffusion-v1-5 --prompts p.txt ...

Arguments after `--` go to `prdp train`. On the CPU torch's launcher gives each process one thread (OMP_NUM_THREADS=1),
and the one-process run here gets the same `threads` per process unless --threads says otherwise. Not a timed test:
run it and quote its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def train(processes: int, out: Path, threads: int | None, flags: list[str]) -> dict:
    name = f"processes-{processes}"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] \
        if processes > 1 else [sys.executable]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    started = time.perf_counter()
    subprocess.run([*launcher, "-m", "prdp_core.cli", "train", "--quiet", "--out", str(out), "--run-name", name,
                    *flags], env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    run = out / name
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if "timings" in e]
    later = [e["timings"]["total"] for e in epochs[1:]] or [epochs[0]["timings"]["total"]]
    return {"processes": processes, "wall_s": round(wall, 2), "epoch_s_median_after_first": round(
        statistics.median(later), 3), "epoch_s": [round(e["timings"]["total"], 3) for e in epochs],
            "sampling_s_median": round(statistics.median(e["timings"]["sampling"] for e in epochs), 3),
            "optimization_s_median": round(statistics.median(e["timings"]["optimization"] for e in epochs), 3),
            "lora": str(sorted(run.glob("checkpoints/epoch-*/adapter.safetensors"))[-1])}


def relative_difference(path: str, reference: str) -> float:
    ours, theirs = load_file(path), load_file(reference)
    difference = sum(((ours[k].double() - theirs[k].double()) ** 2).sum() for k in theirs).sqrt()
    return (difference / sum((theirs[k].double() ** 2).sum() for k in theirs).sqrt()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2", help="process counts to run, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process (0: the launcher's default)")
    parser.add_argument("flags", nargs="*", help="prdp train flags (after --)")
    args = parser.parse_args()
    flags = args.flags or ["--epochs", "4", "--eval-max-prompts", "2", "--eval-images-per-prompt", "2"]
    with tempfile.TemporaryDirectory() as folder:
        runs = [train(int(p), Path(folder), args.threads or None, flags) for p in args.processes.split(",")]
        reference = runs[0]["lora"]
        for run in runs:
            run["lora_relative_difference_to_first"] = relative_difference(run.pop("lora"), reference)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                      "torch": torch.__version__, "cuda_devices": torch.cuda.device_count(), "flags": flags,
                      "threads_per_process": args.threads or "launcher default", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
