"""What a large prompt file costs a run, as JSON: the same short run (builtin:tiny, 2 epochs) from prompt files of
10 lines to millions, each in a fresh process: seconds from the process start to the run's start (RunStarted: the
prompts indexed, the model loaded), seconds for the epochs, and the process's peak resident memory.

    python bench/bench_prompts.py                        # 10, 100,000 and 1,000,000 lines
    python bench/bench_prompts.py --lines 10,10000000

Not a timed test: run it and quote its output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = "--child"
ANIMALS = ["fox", "owl", "cat", "elk", "crow", "seal", "hare", "wolf"]
PLACES = ["forest", "desert", "harbour", "meadow", "city at night", "snowfield"]


def write_prompts(path: Path, lines: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(lines):
            f.write(f"a photo of a {ANIMALS[i % 8]} in the {PLACES[i % 6]}, picture number {i}\n")


def child(prompt_file: str, out: str) -> None:
    """One run in this process; prints its timings and peak memory."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from prdp_core.config import TrainConfig
    from prdp_core.trainer import Trainer

    started = {}
    config = TrainConfig(model="builtin:tiny", prompts=prompt_file, eval_prompts="",
                         rewards={"jpeg_compressibility": 1.0}, epochs=2, prompts_per_epoch=2, images_per_prompt=2,
                         num_steps=4, eval_max_prompts=2, eval_images_per_prompt=1, output_dir=out)
    trainer = Trainer(config, on_event=lambda e: started.setdefault(e.kind, time.perf_counter()))
    trainer.run()
    print(json.dumps({"start_s": started["RunStarted"] - START, "epochs_s": time.perf_counter() - started["RunStarted"],
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", default="10,100000,1000000", help="prompt file sizes, comma-separated")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for lines in [int(n) for n in args.lines.split(",")]:
            path = Path(folder) / f"prompts-{lines}.txt"
            write_prompts(path, lines)
            out = subprocess.run([sys.executable, __file__, CHILD, str(path), str(Path(folder) / "runs")],
                                 check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            results.append({"lines": lines, "file_mb": round(path.stat().st_size / 2**20, 1),
                            **{k: round(v, 3) for k, v in result.items()}})
    first = results[0]
    for result in results:
        result["start_s_more_than_first"] = round(result["start_s"] - first["start_s"], 3)
        result["peak_rss_mb_more_than_first"] = round(result["peak_rss_mb"] - first["peak_rss_mb"], 1)
    print(json.dumps({"runs": results}, indent=2))


START = time.perf_counter()
if __name__ == "__main__":
    if sys.argv[1:2] == [CHILD]:
        child(*sys.argv[2:4])
    else:
        main()
