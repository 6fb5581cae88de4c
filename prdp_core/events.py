"""Typed events the trainer emits; hosts render progress from them. Nothing in the engine prints to a UI.

Epoch numbers count from 1: training events carry the number of the epoch in progress (and EpochEnd the one just
finished); evaluation and checkpoint events carry how many epochs are complete (0 before training)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Event:
    @property
    def kind(self) -> str:
        return type(self).__name__


@dataclass
class RunStarted(Event):
    run_dir: Path
    config: Any  # TrainConfig
    start_epoch: int  # 0 for a new run, the resumed epoch otherwise
    lora_modules: int
    eval_sets: list[str]  # in the order every evaluation samples them; phase "eval <set>"
    evaluation: str = ""  # which prompts the evaluations sample, in one line


@dataclass
class Progress(Event):
    """Fine-grained progress inside a phase (sampling, reference, reward, optimization, eval)."""

    epoch: int
    phase: str
    done: int
    total: int


@dataclass
class EpochSampled(Event):
    epoch: int
    prompts: list[str]  # one per image
    images: list  # PIL previews (a subset of the epoch's images)
    rewards: list[float]  # total reward of each preview image
    reward_mean: float
    components: dict[str, float]  # mean of each reward component over the epoch


@dataclass
class StepMetrics(Event):
    epoch: int
    update: int  # 0 .. K-1
    global_step: int
    loss: float
    grad_norm: float
    stats: dict[str, float]


@dataclass
class Evaluated(Event):
    epoch: int
    label: str  # "before", "after" or "epoch-N"
    results: dict[str, dict]  # eval set -> {"mean", "se", "n", "components"}


@dataclass
class EpochEnd(Event):
    epoch: int  # 1-based count of completed epochs
    metrics: dict[str, Any]


@dataclass
class CheckpointWritten(Event):
    epoch: int
    path: Path


@dataclass
class Finished(Event):
    run_dir: Path
    lora_path: Path | None
    summary: dict[str, Any] = field(default_factory=dict)
    cancelled: bool = False


@dataclass
class Failed(Event):
    message: str
    run_dir: Path | None
