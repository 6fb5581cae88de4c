"""How much of a run's measured gain is its evaluation's luck: re-evaluate a finished run on other seeds, as JSON.

    python bench/reevaluate.py runs/20261202-101500 --eval-seeds 1 2 3
    python bench/reevaluate.py runs/20261202-101500 --eval-seeds 1 --eta 0     # deterministic DDIM sampling

A run evaluates the base model and its LoRA once, on noise fixed by its seed. This samples the same evaluation
prompts again, with and without the run's final LoRA, on the noise of other seeds (and optionally another DDIM eta),
and reports per split and seed: the base model's mean reward, the paired change with its standard error, and how
many images flipped up or down (changed by more than --flip). The run folder is only read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prdp_core import TrainConfig, Trainer  # noqa: E402
from prdp_core.checkpoints import latest_checkpoint, load_checkpoint  # noqa: E402
from prdp_core.models import lora_disabled  # noqa: E402
from prdp_core.trainer import CONFIG_FILE  # noqa: E402


def paired_change(before: list[float], after: list[float], flip: float) -> dict:
    diff = torch.tensor(after, dtype=torch.float64) - torch.tensor(before, dtype=torch.float64)
    se = diff.std().item() / len(diff) ** 0.5
    return {"before": sum(before) / len(before), "change": diff.mean().item(), "se": se,
            "z": diff.mean().item() / se if se > 0 else None,
            "flips_up": int((diff > flip).sum()), "flips_down": int((diff < -flip).sum())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="A run folder written by prdp train.")
    parser.add_argument("--eval-seeds", type=int, nargs="+", default=[1], help="Seeds of the evaluation noise.")
    parser.add_argument("--eta", type=float, default=None, help="DDIM eta for these samples (default: the run's).")
    parser.add_argument("--flip", type=float, default=0.3, help="A change larger than this counts as a flip.")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        parser.error(f"{run_dir} has no checkpoint")
    from peft.utils import set_peft_model_state_dict

    with tempfile.TemporaryDirectory() as scratch:
        config = TrainConfig.load(run_dir / CONFIG_FILE)
        config.output_dir, config.run_name = scratch, "reevaluate"
        trainer = Trainer(config)
        trainer.setup()  # the model with a fresh LoRA, in the scratch folder
        weights, _, _ = load_checkpoint(checkpoint)
        set_peft_model_state_dict(trainer.unet, {k: v.to(trainer.device) for k, v in weights.state_dict.items()})
        if args.eta is not None:
            trainer.sampler.eta = args.eta
        results = {}
        for seed in args.eval_seeds:
            trainer.config.seed = seed  # the evaluation noise is keyed by the seed
            with lora_disabled(trainer.unet):
                before, _ = trainer.evaluate("before")
            after, _ = trainer.evaluate("after")
            results[seed] = {split: paired_change(before[split]["scores"], after[split]["scores"], args.flip)
                             for split in before}
    print(json.dumps({"run": str(run_dir), "checkpoint": checkpoint.name, "eta": trainer.sampler.eta,
                      "by_eval_seed": results}, indent=2))


if __name__ == "__main__":
    main()
