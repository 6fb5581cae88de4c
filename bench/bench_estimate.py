"""How well the tab's time estimate predicts a run, as JSON: a first run measures this machine's pace, then runs of
other sizes are estimated before they start and timed.

    python bench/bench_estimate.py                   # the toy model: a quick-try run, then the other sizes
    python bench/bench_estimate.py --model builtin:tiny --prompts builtin:animals --eval-prompts ""

The estimate is what the tab shows before start (no model loading in it); `actual_s` is the run's wall time without
loading the model (from RunStarted to the end). Not a timed test: run it and quote its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from prdp_core.config import TrainConfig  # noqa: E402
from prdp_core.estimate import run_work  # noqa: E402
from prdp_core.events import RunStarted  # noqa: E402
from prdp_core.prompts import evaluation_sets  # noqa: E402
from prdp_core.session import measured_pace  # noqa: E402
from prdp_core.trainer import Trainer  # noqa: E402

QUICK = {"epochs": 2, "prompts_per_epoch": 2, "images_per_prompt": 4, "num_steps": 10, "eval_max_prompts": 4,
         "eval_images_per_prompt": 2}
SIZES = [  # each differs from the quick try in where the work goes
    {"epochs": 4},
    {"images_per_prompt": 8, "updates_per_epoch": 2},
    {"num_steps": 20, "train_step_fraction": 0.5},
    {"eval_max_prompts": 16, "eval_images_per_prompt": 4},
]


def timed_run(config: TrainConfig) -> float:
    began = []
    Trainer(config, lambda event: began.append(time.perf_counter()) if isinstance(event, RunStarted) else None).run()
    return time.perf_counter() - began[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--prompts", default="builtin:toy_train")
    parser.add_argument("--eval-prompts", default="builtin:toy_unseen")
    parser.add_argument("--reward", default="toy_match")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    out = tempfile.mkdtemp(prefix="prdp-bench-estimate-")
    base = {**TrainConfig().to_dict(), "model": args.model, "prompts": args.prompts, "eval_prompts": args.eval_prompts,
            "rewards": {args.reward: 1.0}, "output_dir": out, "device": "cpu", **QUICK}
    calibration = timed_run(TrainConfig.from_dict(base))
    rows = []
    for changes in SIZES:
        config = TrainConfig.from_dict({**base, **changes})
        work = run_work(config, evaluation_sets(config))
        estimate = measured_pace(out, config) * work.total
        actual = timed_run(config)
        rows.append({"changes": changes, "estimate_s": round(estimate, 2), "actual_s": round(actual, 2),
                     "ratio": round(actual / estimate, 3)})
    print(json.dumps({"machine": platform.machine(), "threads": torch.get_num_threads(), "model": args.model,
                      "calibration_run_s": round(calibration, 2), "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
