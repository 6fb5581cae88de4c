"""What a run folder shows people: each epoch's samples, the reward curve, the before/after grid, the summary, and
the traceback of a failure. The trainer calls these; they draw and write, and decide nothing about training."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np

from .evaluation import paired_delta
from .files import atomic_write_text
from .plots import image_grid, line_plot

BEFORE_AFTER_PROMPTS = 4  # prompts of each evaluation set that the before/after grid shows
EPOCH_PREVIEW_PROMPTS = 2  # prompts of each epoch whose samples the previews show


def save_epoch_preview(run_dir: Path, epoch: int, prompts: list[str], images: list, rewards: list[float],
                       per_prompt: int) -> None:
    """`previews/epoch-NNNN.png`: the shown images, a row per prompt, each with its reward."""
    rows = [images[r * per_prompt:(r + 1) * per_prompt] for r in range(len(images) // per_prompt)]
    captions = [[f"{v:.4g}" for v in rewards[r * per_prompt:(r + 1) * per_prompt]] for r in range(len(rows))]
    image_grid(rows, captions, [f"epoch {epoch}: {p}" for p in prompts[:len(rows)]]).save(
        run_dir / "previews" / f"epoch-{epoch:04d}.png")


def append_metrics(path: Path, metrics: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(metrics) + "\n")


def plot_reward_curve(metrics_path: Path, out: Path, mix: str, rewards: list[str],
                      before_seen: float | None) -> None:
    """The reward per epoch (± its std over the epoch's samples), each component's for a mix of several, and the
    evaluations of the seen prompts (from `before_seen`, the mean before training)."""
    rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lines = [m for m in rows if "reward_mean" in m]
    epochs = [m["epoch"] for m in lines]
    series = {"reward (training samples)": (epochs, [m["reward_mean"] for m in lines])}
    bands = {"reward (training samples)": [m["reward_std"] for m in lines]}
    if len(rewards) > 1:
        for name in rewards:
            series[name] = (epochs, [m["rewards"][name]["mean"] for m in lines])
    evals = ([(0, before_seen)] if before_seen is not None else []) + [(m["epoch"], m["eval"]["seen"]["mean"])
                                                                       for m in rows if "eval" in m]
    if len(evals) > 1:
        series["eval, seen prompts (fixed seeds)"] = ([e for e, _ in evals], [v for _, v in evals])
    line_plot(series, f"reward per epoch: {mix}", bands=bands).save(out)


def save_before_after(out: Path, eval_sets: dict[str, list[str]], count: int, before: tuple[dict, dict],
                      after: tuple[dict, dict]) -> None:
    """Up to BEFORE_AFTER_PROMPTS prompts of each eval set, before and after, on the same seeds: each image with its
    reward, each row with the prompt's mean, so the picture says what changed. `before` and `after` are (images by
    set, results by set) of the two evaluations."""
    rows, captions, titles = [], [], []
    for name, prompts in eval_sets.items():
        for j, prompt in enumerate(prompts[:BEFORE_AFTER_PROMPTS]):
            for label, (images, results) in (("before", before), ("after", after)):
                scores = results[name]["scores"][j * count:(j + 1) * count]
                rows.append(images[name][j * count:(j + 1) * count])
                captions.append([f"{score:.3g}" for score in scores])
                titles.append(f"{label} | {name}: {prompt} | mean reward {np.mean(scores):.3g}")
    image_grid(rows, captions, titles).save(out)


def write_summary(path: Path, before: dict, after: dict, lora: Path, wall_time_s: float, epochs: int, mix: str,
                  config) -> dict:
    """summary.json: each eval set before and after on the same seeds with the paired change, wall time, the LoRA,
    the reward mix and the config."""
    summary = {
        "eval": {name: {"before": before[name], "after": after[name],
                        "delta": paired_delta(before[name]["scores"], after[name]["scores"])} for name in after},
        "wall_time_s": wall_time_s,
        "epochs": epochs,
        "lora": str(lora),
        "reward_mix": mix,
        "model": config.model,
        "config": config.to_dict(),
    }
    atomic_write_text(path, json.dumps(summary, indent=2))
    return summary


def log_traceback(run_dir: Path) -> Path | None:
    """The exception being handled, in full, as the run folder's error.log (None if it cannot be written)."""
    log = run_dir / "error.log"
    try:
        log.write_text(traceback.format_exc(), encoding="utf-8")
    except OSError:
        return None
    return log
