"""RunSession: what the tab (and later the ComfyUI nodes) drive: one run per process in a background thread, stop
with a resumable checkpoint, resume, a failure reported as a message with the session still usable."""

import math
import threading

import pytest

from prdp_core.config import TrainConfig
from prdp_core.errors import PrdpError
from prdp_core.session import BusyError, RunSession


def _with(config: TrainConfig, **changes) -> TrainConfig:
    return TrainConfig.from_dict({**config.to_dict(), **changes})


def test_a_run_fills_the_snapshot(tiny_config):
    changes = []
    session = RunSession(on_change=changes.append)
    session.start(_with(tiny_config, epochs=2, rewards={"jpeg_compressibility": 1.0, "jpeg_incompressibility": 0.5}))
    assert session.wait(600)
    state = session.snapshot()
    assert state.status == "finished" and not state.error
    assert (state.epoch, state.epochs) == (2, 2)
    assert [row["epoch"] for row in state.curve] == [1, 2]
    assert set(state.curve[0]) == {"epoch", "reward", "jpeg_compressibility", "jpeg_incompressibility"}
    row = state.curve[0]
    assert row["reward"] == pytest.approx(row["jpeg_compressibility"] + 0.5 * row["jpeg_incompressibility"], rel=1e-5)
    assert state.samples
    for image, caption in state.samples:  # "reward | prompt" under each of the latest epoch's images
        reward, prompt = caption.split(" | ")
        assert math.isfinite(float(reward)) and prompt and image.size == (64, 64)
    assert set(state.evaluations) == {"before", "after"} and "seen" in state.evaluations["after"]
    assert state.lora_path.is_file() and state.lora_path.parent == state.run_dir
    assert any("epoch 2/2" in line for line in state.log)
    assert changes and changes[-1].status == "finished"  # faces can be pushed to instead of polling
    fractions = [snapshot.fraction() for snapshot in changes]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # a progress bar that never runs backwards


def test_one_run_per_process(tiny_config):
    release = threading.Event()
    first = RunSession(on_change=lambda snapshot: release.wait(60))  # holds the run at its first event
    first.start(tiny_config)
    try:
        with pytest.raises(BusyError, match="already in progress"):
            RunSession().start(tiny_config)
    finally:
        release.set()
    assert first.wait(600) and first.snapshot().status == "finished"
    second = RunSession()
    second.start(tiny_config)  # the process is free again
    assert second.wait(600) and second.snapshot().status == "finished"


def test_stop_leaves_a_resumable_run(tiny_config):
    stops = []

    def stop_once_after_epoch_1(snapshot):
        if snapshot.epoch == 1 and not stops:
            stops.append(snapshot.epoch)
            session.stop()
    session = RunSession(on_change=stop_once_after_epoch_1)
    session.start(_with(tiny_config, epochs=3))
    assert session.wait(600)
    stopped = session.snapshot()
    assert stopped.status == "stopped" and stopped.epoch == 1 and (stopped.run_dir / "checkpoints").is_dir()
    assert stopped.lora_path.is_file()  # what a stopped run has learnt is exported, not lost

    session.resume(stopped.run_dir)
    assert session.wait(600)
    resumed = session.snapshot()
    assert resumed.status == "finished" and resumed.run_dir == stopped.run_dir
    assert [row["epoch"] for row in resumed.curve] == [1, 2, 3]  # the curve picks up the stopped run's epoch
    assert resumed.curve[0] == stopped.curve[0]
    assert any("resumed after epoch 1" in line for line in resumed.log)


def test_a_failed_run_reports_and_frees_the_session(tiny_config, tmp_path):
    session = RunSession()
    session.start(_with(tiny_config, model=str(tmp_path / "missing.safetensors")))
    assert session.wait(600)
    state = session.snapshot()
    assert state.status == "failed" and "does not exist" in state.error and "\n" not in state.error
    assert state.log[-1].endswith(state.error)
    with pytest.raises(PrdpError, match="none.txt"):  # bad settings fail at start, before any thread, and hold nothing
        session.start(_with(tiny_config, prompts=str(tmp_path / "none.txt")))
    session.start(tiny_config)
    assert session.wait(600) and session.snapshot().status == "finished"


def test_a_stopped_run_whose_export_fails_ends_failed(tiny_config, monkeypatch):
    from prdp_core import trainer

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(trainer, "export_lora", full_disk)
    session = RunSession(on_change=lambda snapshot: snapshot.epoch == 1 and session.stop())
    session.start(_with(tiny_config, epochs=3))
    assert session.wait(600)
    state = session.snapshot()
    assert state.status == "failed" and "No space left on device" in state.error and "\n" not in state.error
    assert (state.run_dir / "error.log").is_file() and "error.log" in state.error  # as any failure of the trainer's
    assert not session.running and state.ended_at  # the session is free for the next run
