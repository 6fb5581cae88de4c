"""Epoch checkpoints inside a run folder: the adapter, the optimiser state and the loop state.

`checkpoints/epoch-NNNN/` is complete once renamed into place (written as `.tmp` first), so a crash mid-write
never leaves a checkpoint that looks usable. Epoch 0 is the state before any update, so even a run stopped
during its first epoch can be resumed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from .errors import PrdpError
from .lora_weights import LoraWeights

FOLDER = "checkpoints"
_NAME = re.compile(r"epoch-\d+")


def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return Path(run_dir) / FOLDER / f"epoch-{epoch:04d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / FOLDER
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.fullmatch(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=checkpoint_epoch)


def checkpoint_epoch(path: Path) -> int:
    """How many epochs a checkpoint folder holds (0: before the first update)."""
    return int(path.name[len("epoch-"):])


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, epoch: int, weights: LoraWeights, optimizer_state: dict, state: dict,
                    keep: int) -> Path:
    final = checkpoint_path(run_dir, epoch)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights.save(tmp / "adapter.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    stale = final.with_name(final.name + ".old")
    if final.exists():  # re-saving an epoch (epoch 0 is saved before and after the first evaluation)
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
    os.replace(tmp, final)
    shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[LoraWeights, dict, dict]:
    try:
        weights = LoraWeights.load(path / "adapter.safetensors")
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise PrdpError(f"checkpoint {path} is unreadable ({exc}); delete it to resume from the one before.") from None
    return weights, optimizer_state, state
