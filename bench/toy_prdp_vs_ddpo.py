"""PRDP against DDPO on the toy world, at the same budget: the paper's large-scale claim in miniature.

Both objectives run the default config (`prdp train` with no arguments: the toy model, the 1,730 training captions
of builtin:toy_train, toy_match, evaluation before and after on fixed seeds for 16 seen captions and 16 of the 510
held-out ones of builtin:toy_unseen) with only --objective changed; override any setting for both with --set
KEY=VALUE. Prints JSON, then Markdown tables.

    python bench/toy_prdp_vs_ddpo.py --seeds 0 1 2
    # the table in docs/toy-world.md: 4x the evaluation (512 images per split), about 9 minutes per run on 2 cores
    python bench/toy_prdp_vs_ddpo.py --seeds 0 1 2 --set eval_max_prompts=32 --set eval_images_per_prompt=16
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prdp_core import TrainConfig, Trainer  # noqa: E402


def run(objective: str, seed: int, overrides: dict, out: str) -> dict:
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **overrides, "objective": objective, "seed": seed,
                                    "output_dir": out, "run_name": f"{objective}-{seed}"})
    trainer = Trainer(config)
    trainer.run()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    return {"objective": objective, "seed": seed, "wall_time_s": summary["wall_time_s"], "eval": summary["eval"],
            "reward": " + ".join(config.rewards)}


def table(results: list[dict]) -> str:
    def cell(objective: str, split: str, when: str, sign: str = "") -> str:
        # The seeds' evaluations are independent, so the pooled mean's variance is the mean variance / n.
        values = [r["eval"][split][when] for r in results if r["objective"] == objective]
        mean = statistics.fmean(v["mean"] for v in values)
        se = statistics.fmean(v["se"] ** 2 for v in values) ** 0.5 / len(values) ** 0.5
        return f"{mean:{sign}.3f} ± {se:.3f}"

    seeds = sorted({r["seed"] for r in results})
    lines = ["| prompts | before | after PRDP | after DDPO | change PRDP | change DDPO |", "|---|---|---|---|---|---|"]
    for split in ("seen", "unseen"):
        lines.append(f"| {split} | {cell('prdp', split, 'before')} | {cell('prdp', split, 'after')} | "
                     f"{cell('ddpo', split, 'after')} | {cell('prdp', split, 'delta', '+')} | "
                     f"{cell('ddpo', split, 'delta', '+')} |")
    lines += ["", "| seed | PRDP change, seen | PRDP change, unseen | DDPO change, seen | DDPO change, unseen |",
              "|---|---|---|---|---|"]
    for seed in seeds:
        deltas = [r["eval"][split]["delta"] for objective in ("prdp", "ddpo") for r in results
                  if r["objective"] == objective and r["seed"] == seed for split in ("seen", "unseen")]
        lines.append(f"| {seed} | " + " | ".join(f"{d['mean']:+.3f} ± {d['se']:.3f}" for d in deltas) + " |")
    return "\n".join(lines) + (f"\n\n({results[0]['reward']}: mean ± standard error; changes are after minus "
                              f"before on the same seeds; seeds {', '.join(map(str, seeds))})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Config override for both runs (JSON value), e.g. --set eval_max_prompts=16.")
    parser.add_argument("--out", default="", help="Keep the run folders here (default: a temporary folder).")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or scratch
        results = [run(objective, seed, overrides, out)
                   for seed in args.seeds for objective in ("prdp", "ddpo")]
    print(json.dumps({"overrides": overrides, "results": results}, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
