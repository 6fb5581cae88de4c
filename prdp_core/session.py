"""One training run per process, driven from a UI: start, stop (leaving a resumable checkpoint), resume, and a
snapshot of what a face shows (status, progress, reward curve per component, latest samples, evaluations, log).

The trainer runs in a background thread and reports through its events; faces (the Gradio tab, ComfyUI nodes) poll
`snapshot()` from their own threads. A failed run ends in status "failed" with its one-sentence message; the process
and the session stay usable."""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ContextManager

from .config import TrainConfig
from .errors import PrdpError
from .estimate import RunWork, run_work
from .events import (CheckpointWritten, EpochEnd, EpochSampled, Evaluated, Event, Failed, Finished, Progress,
                     RunStarted, StepMetrics)

log = logging.getLogger("prdp")

# The model, the GPU and the run folder are not shared: one run at a time in this process, whichever face started it.
_RUN_LOCK = threading.Lock()
LOG_LINES = 200  # the log a face shows; the run folder keeps everything


class BusyError(PrdpError):
    """Another run holds this process."""


@dataclass
class Snapshot:
    status: str = "idle"  # idle | running | finished | stopped | failed
    run_dir: Path | None = None
    epoch: int = 0  # completed epochs
    epochs: int = 0
    phase: str = ""
    phase_done: int = 0
    phase_total: int = 0
    curve: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, reward, then each component
    samples: list[tuple[Any, str]] = field(default_factory=list)  # latest epoch: (PIL image, "reward | prompt")
    sampled: int = 0  # how many times `samples` was replaced, so a face redraws the gallery only when it changed
    evaluations: dict[str, dict] = field(default_factory=dict)  # "before" / "epoch-N" / "after" -> set -> stats
    log: list[str] = field(default_factory=list)
    logged: int = 0  # lines ever added to `log` (which keeps the last LOG_LINES), so a face can print only new ones
    eval_sets: list[str] = field(default_factory=list)  # what each evaluation samples, in order
    error: str = ""
    lora_path: Path | None = None
    started_at: float = 0.0  # time.time() when the run was started (its wait for the GPU included)
    ended_at: float = 0.0  # time.time() when it finished, stopped or failed; 0 while it runs
    work: RunWork | None = None  # the run's UNet work, for the progress fraction and the time left
    work_started_at: float = 0.0  # time.time() when the trainer began working (model loaded, GPU held)
    work_at_start: float = 0.0  # work done by then (a resumed run's earlier epochs)
    update: int = 0  # the update in progress of an epoch's optimisation, from 1
    updates: int = 0  # updates per epoch
    stopping: bool = False  # a stop was asked for and the run has not ended yet

    def elapsed(self, now: float | None = None) -> float:
        """Seconds since the run started, up to its end."""
        if not self.started_at:
            return 0.0
        return (self.ended_at or (time.time() if now is None else now)) - self.started_at

    def work_done(self) -> float:
        """UNet work done, in the image-steps of `work` (see estimate.py)."""
        if self.work is None or self.phase == WAITING_FOR_GPU:
            return 0.0
        if self.status == "finished":
            return self.work.total
        return self.work.done(self.epoch, self.evaluations, self.phase, self.phase_done, self.phase_total)

    def fraction(self) -> float:
        """How much of the run's work is done, in [0, 1], for a progress bar."""
        return self.work_done() / self.work.total if self.work is not None and self.work.total else 0.0

    def seconds_left(self, now: float | None = None) -> float | None:
        """The run's estimated remaining time at its pace since it began work (model loading excluded), or None
        until there is a pace to go by."""
        if self.status != "running" or not self.work_started_at or self.work is None:
            return None
        spent = (time.time() if now is None else now) - self.work_started_at
        progressed = self.work_done() - self.work_at_start
        if spent < 2.0 or progressed <= 0:
            return None
        return (self.work.total - self.work_done()) * spent / progressed


WAITING_FOR_GPU = "waiting for the GPU"  # the phase of a started run until the host's gpu_lock lets it begin


class RunSession:
    def __init__(self, on_change: Callable[[Snapshot], None] | None = None,
                 gpu_lock: Callable[[], ContextManager] = contextlib.nullcontext):
        """`on_change` gets every new snapshot (from the training thread); `gpu_lock` is held for the whole run
        (a host's own lock, e.g. A1111's queue_lock, so its generations wait instead of running out of memory)."""
        self._gpu_lock = gpu_lock
        self._state = Snapshot()
        self._guard = threading.Lock()  # guards _state between the training thread and the face's threads
        self._stop: threading.Event | None = None
        self._thread: threading.Thread | None = None
        self._on_change = on_change or (lambda snapshot: None)

    # ------------------------------------------------------------------------------------------ control
    def start(self, config: TrainConfig) -> None:
        """Start a new run. Config, prompt and reward-name errors raise here, before anything runs."""
        from .trainer import Trainer

        self._launch(lambda on_event: Trainer(config, on_event))

    def resume(self, run_dir: str | Path, **changes) -> None:
        """Continue a stopped (or crashed) run from its last checkpoint; `changes` as Trainer.resume allows."""
        from .trainer import Trainer

        self._launch(lambda on_event: Trainer.resume(run_dir, on_event, **changes), continues=Path(run_dir))

    def stop(self) -> None:
        """Ask the run to stop at the next chunk; it checkpoints, exports what it has and ends as "stopped"."""
        if self._stop is not None and not self._stop.is_set():
            self._stop.set()
            with self._guard:
                self._state.stopping = True
            self._log("stopping after the current step...")

    def wait(self, timeout: float | None = None) -> bool:
        """True once no run is in progress (for tests and scripts; faces poll snapshot() instead)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> Snapshot:
        with self._guard:
            return replace(self._state, curve=list(self._state.curve), samples=list(self._state.samples),
                           evaluations=dict(self._state.evaluations), log=list(self._state.log),
                           eval_sets=list(self._state.eval_sets))

    # ------------------------------------------------------------------------------------------ the thread
    def _launch(self, make_trainer: Callable, continues: Path | None = None) -> None:
        if not _RUN_LOCK.acquire(blocking=False):
            raise BusyError("a training run is already in progress in this process; stop it or wait for it to "
                            "finish, then start again.")
        try:
            trainer = make_trainer(self._on_event)
        except BaseException:
            _RUN_LOCK.release()
            raise
        self._stop = threading.Event()
        with self._guard:
            work = run_work(trainer.config, trainer.eval_sets)
            shown, self._state = self._state, Snapshot(status="running", epochs=trainer.config.epochs,
                                                       phase=WAITING_FOR_GPU, started_at=time.time(), work=work,
                                                       updates=trainer.config.updates_per_epoch)
            if continues is not None and shown.run_dir is not None and shown.run_dir.resolve() == continues.resolve():
                # the run on screen goes on: its log and latest samples stay until new ones come
                self._state.log, self._state.logged = shown.log, shown.logged
                self._state.samples, self._state.sampled = shown.samples, shown.sampled
                self._state.evaluations = shown.evaluations
        self._thread = threading.Thread(target=self._run, args=(trainer, self._stop), name="prdp-run", daemon=True)
        self._thread.start()

    def _run(self, trainer, stop: threading.Event) -> None:
        try:
            with self._gpu_lock():
                trainer.run(stop)
        except Exception as exc:  # the trainer has emitted Failed with its message, unless the host's lock failed
            log.warning("run ended with an error", exc_info=True)
            with self._guard:
                unreported = self._state.status == "running"
                if unreported:
                    reason, run_dir = f"{type(exc).__name__}: {exc}", self._state.run_dir
                    self._state.status, self._state.phase, self._state.ended_at = "failed", "", time.time()
                    self._state.stopping = False
                    self._state.error = (
                        f"the host could not hand its GPU over to the run ({reason}); restart the host, then start "
                        f"again." if run_dir is None else f"the run stopped on an unexpected error ({reason}); "
                        f"resume it from {run_dir} after fixing the cause.")
            if unreported:
                self._on_change(self.snapshot())
        finally:
            _RUN_LOCK.release()

    def _on_event(self, event: Event) -> None:
        with self._guard:
            _apply(self._state, event)
        self._on_change(self.snapshot())

    def _log(self, line: str) -> None:
        with self._guard:
            _append_log(self._state, line)
        self._on_change(self.snapshot())


# ---------------------------------------------------------------------------------------------- run folders
@dataclass(frozen=True)
class RunFolder:
    path: Path
    config: TrainConfig  # as the run saved it
    epochs_done: int  # of the latest checkpoint
    finished: bool  # trained, evaluated and exported all the epochs its config asks for


def list_runs(folder: str | Path) -> list[RunFolder]:
    """The run folders in `folder` that have a readable config and a checkpoint, newest first."""
    from . import checkpoints
    from .trainer import SUMMARY_FILE

    runs = []
    for path in Path(folder).iterdir() if Path(folder).is_dir() else ():
        latest = checkpoints.latest_checkpoint(path)
        config = read_run_config(path) if latest is not None else None
        if config is None:
            continue
        done = checkpoints.checkpoint_epoch(latest)
        finished = _read_json(path / SUMMARY_FILE).get("epochs") == done == config.epochs
        runs.append(RunFolder(path, config, done, finished))
    return sorted(runs, key=lambda run: run.path.stat().st_mtime_ns, reverse=True)


def matching_runs(folder: str | Path, config: TrainConfig, ignore: tuple[str, ...] = ()) -> list[RunFolder]:
    """The runs in `folder` (newest first) that trained with `config`, but for the settings a resumed run may change
    and `ignore`d ones: a face continues one (or reuses a finished one) instead of training the same thing again."""
    from .trainer import RESUMABLE

    def identity(c: TrainConfig) -> dict:
        return {k: v for k, v in c.to_dict().items() if k not in (*RESUMABLE, *ignore, "run_name", "output_dir")}

    wanted = identity(config)
    return [run for run in list_runs(folder) if identity(run.config) == wanted]


PACE_SETTINGS = ("model", "vae", "resolution", "precision", "device")  # runs with these equal run at one pace


def measured_pace(runs_folder: str | Path, config: TrainConfig) -> float | None:
    """Seconds per image-step that earlier runs in `runs_folder` measured with the same model, size, precision and
    device (the median of their epochs), or None where none did."""
    from .trainer import METRICS_FILE

    paces = []
    for run in list_runs(runs_folder):
        if any(getattr(run.config, name) != getattr(config, name) for name in PACE_SETTINGS):
            continue
        work = run_work(run.config, {})
        for line in (run.path / METRICS_FILE).read_text(encoding="utf-8").splitlines():
            metrics = json.loads(line) if line.strip() else {}
            seconds = metrics.get("timings", {}).get("total")
            if seconds:
                paces.append(seconds / work.epoch_work(metrics["epoch"]))
        if paces:
            return statistics.median(paces)
    return None


def read_run_config(run_dir: Path) -> TrainConfig | None:
    """The config a run folder saved, or None where there is none that loads."""
    from .trainer import CONFIG_FILE

    try:
        return TrainConfig.load(run_dir / CONFIG_FILE)
    except PrdpError:  # not a run folder, or one written by an incompatible version: not a match
        return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _apply(state: Snapshot, event: Event) -> None:
    """Fold one trainer event into what a face shows."""
    if isinstance(event, RunStarted):
        state.run_dir, state.epoch, state.eval_sets = event.run_dir, event.start_epoch, list(event.eval_sets)
        state.phase = ""  # the gpu_lock is held: no longer waiting
        state.epochs = event.config.epochs
        if event.start_epoch:  # a resumed run's curve starts with the epochs already in its metrics
            from .trainer import METRICS_FILE

            lines = (event.run_dir / METRICS_FILE).read_text(encoding="utf-8").splitlines()
            state.curve = [_curve_row(m) for m in map(json.loads, filter(str.strip, lines)) if "reward_mean" in m]
        state.work_started_at, state.work_at_start = time.time(), state.work_done()
        _append_log(state, f"run folder {event.run_dir}; LoRA on {event.lora_modules} modules"
                           + (f"; resumed after epoch {event.start_epoch}" if event.start_epoch else ""))
        _append_log(state, event.evaluation)
    elif isinstance(event, Progress):
        if event.phase == "optimization" and state.phase != "optimization":
            state.update = 1
        state.phase, state.phase_done, state.phase_total = event.phase, event.done, event.total
    elif isinstance(event, StepMetrics):
        state.update = min(event.update + 2, state.updates)  # the update after the one just made
    elif isinstance(event, EpochSampled):
        state.samples = [(image, f"{reward:.4g} | {prompt}")
                         for image, reward, prompt in zip(event.images, event.rewards, event.prompts)]
        state.sampled += 1
    elif isinstance(event, EpochEnd):
        state.epoch, state.phase, state.phase_done, state.phase_total = event.epoch, "", 0, 0
        state.curve.append(_curve_row(event.metrics))
        _append_log(state, f"epoch {event.epoch}/{state.epochs}: reward {event.metrics['reward_mean']:.4g}")
    elif isinstance(event, Evaluated):
        state.evaluations[event.label] = event.results
        state.phase, state.phase_done, state.phase_total = "", 0, 0
        means = ", ".join(f"{name} {stats['mean']:.4g} ± {stats['se']:.2g}" for name, stats in event.results.items())
        _append_log(state, f"evaluation {event.label}: {means}")
    elif isinstance(event, CheckpointWritten):
        _append_log(state, f"checkpoint {event.path.name}")
    elif isinstance(event, Finished):
        state.status, state.stopping = "stopped" if event.cancelled else "finished", False
        state.lora_path, state.phase, state.ended_at = event.lora_path, "", time.time()
        _append_log(state, f"{state.status}; LoRA {event.lora_path}" if event.lora_path else state.status)
    elif isinstance(event, Failed):
        state.status, state.error, state.phase, state.ended_at = "failed", event.message, "", time.time()
        state.stopping = False
        _append_log(state, f"failed: {event.message}")


def _curve_row(metrics: dict) -> dict[str, float]:
    """One epoch of the reward curve: the weighted total and each component's mean."""
    return {"epoch": metrics["epoch"], "reward": metrics["reward_mean"],
            **{name: stats["mean"] for name, stats in metrics.get("rewards", {}).items()}}


def _append_log(state: Snapshot, line: str) -> None:
    state.log.append(f"{time.strftime('%H:%M:%S')} {line}")
    state.logged += 1
    del state.log[:-LOG_LINES]
