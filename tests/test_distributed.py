"""One training over several processes, launched by torch's own launcher (torchrun) with Gloo on the CPU, against the
same run in one process. Every process gets one thread, so that the process count is the only difference between the
runs: then the LoRA, the metrics and the evaluations are equal to the bit (the issue asks for 1e-5 relative)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prdp_core.checkpoints import checkpoint_epoch, latest_checkpoint
from prdp_core.distributed import Processes
from prdp_core.errors import ConfigError

# 3 prompts per epoch over 2 processes: the uneven split (2 + 1), and a chunk never spans two processes
RUN_FLAGS = ["--prompts-per-epoch", "3", "--images-per-prompt", "2", "--batch-size", "2", "--num-steps", "6",
             "--epochs", "3", "--eval-images-per-prompt", "2", "--eval-max-prompts", "3", "--quiet"]
WRITES_LOG = "PRDP_TEST_WRITES_LOG"
# Records, per process, every file and folder change that Python makes under the runs folder (audit hooks see open()
# for writing, mkdir, rename, replace, remove and rmtree), so that a test can tell which process wrote.
SITECUSTOMIZE = f"""
import os, sys
_log, _root = os.environ.get("{WRITES_LOG}"), os.environ.get("PRDP_TEST_RUNS")
_CHANGES = {{"os.mkdir", "os.rename", "os.replace", "os.remove", "shutil.rmtree"}}
def _hook(event, args):
    if event == "open" and args and isinstance(args[1], str) and any(m in args[1] for m in "wax+"):
        path = args[0]
    elif event in _CHANGES and args:
        path = args[0]
    else:
        return
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(_root):
        with open(f"{{_log}}.{{os.environ.get('RANK', '0')}}", "a") as f:
            f.write(f"{{event}} {{os.fspath(path)}}\\n")
if _log and _root:
    sys.addaudithook(_hook)
"""


def _env(tmp_path: Path, **extra) -> dict:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    python_path = os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": python_path,
            "PRDP_TEST_RUNS": str(tmp_path / "runs"), **extra}


def _train_command(processes: int, *args: str) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "prdp_core.cli", "train", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "prdp_core.cli", "train", *args]


def _kill_all(launcher: subprocess.Popen, marker: str, sig=signal.SIGKILL) -> None:
    """The launcher and every process whose command line holds `marker`: torchrun starts each worker in a session
    of its own, which a kill of the launcher's process group does not reach (Linux: reads /proc)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), sig)
        except (OSError, ValueError):
            pass  # ended meanwhile
    launcher.wait()


def _train(tmp_path: Path, processes: int, name: str, *extra: str, **env) -> Path:
    out = tmp_path / "runs"
    result = subprocess.run(_train_command(processes, *RUN_FLAGS, "--out", str(out), "--run-name", name, *extra),
                            env=_env(tmp_path, **env), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / name


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("one")
    return _train(tmp_path, 1, "one")


def _lora(run: Path, epoch: int = 3) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"epoch-{epoch:04d}" / "adapter.safetensors")


def _assert_same_lora(run: Path, reference: Path, epoch: int = 3) -> None:
    ours, theirs = _lora(run, epoch), _lora(reference, epoch)
    assert ours.keys() == theirs.keys()
    difference = sum(((ours[k].double() - theirs[k].double()) ** 2).sum() for k in ours).sqrt()
    scale = sum((theirs[k].double() ** 2).sum() for k in theirs).sqrt()
    assert scale > 0 and difference <= 1e-5 * scale


def _assert_close(ours, theirs, rel=1e-5) -> None:
    """Equal structure, and equal numbers within `rel` (pytest.approx does not nest)."""
    if isinstance(theirs, dict):
        assert ours.keys() == theirs.keys()
        for key in theirs:
            _assert_close(ours[key], theirs[key], rel)
    elif isinstance(theirs, (list, tuple)):
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            _assert_close(a, b, rel)
    else:
        assert ours == pytest.approx(theirs, rel=rel, abs=1e-12)


def _files(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)).replace(run.name, "RUN") for p in run.rglob("*"))


def _numbers(run: Path) -> tuple[list[dict], dict]:
    """metrics.jsonl without the timings, and summary.json's evaluations."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        line.pop("timings", None)
    return lines, json.loads((run / "summary.json").read_text())["eval"]


def test_two_processes_train_the_one_process_lora_with_the_same_metrics_and_evaluations(tmp_path, one_process_run):
    env = {WRITES_LOG: str(tmp_path / "writes")}
    run = _train(tmp_path, 2, "two", **env)
    _assert_same_lora(run, one_process_run)
    metrics, evaluations = _numbers(run)
    reference_metrics, reference_evaluations = _numbers(one_process_run)
    assert len(metrics) == 3
    _assert_close(metrics, reference_metrics)
    assert evaluations.keys() == {"seen", "unseen"}
    _assert_close(evaluations, reference_evaluations)
    # process 0 alone wrote the run folder, and wrote all of it
    assert "checkpoints/epoch-0003" in (tmp_path / "writes.0").read_text()
    assert not (tmp_path / "writes.1").exists()
    assert _files(run) == _files(one_process_run)


def _start_two_processes(tmp_path: Path, name: str, *extra: str, **pipes) -> subprocess.Popen:
    return subprocess.Popen(_train_command(2, *RUN_FLAGS, *extra, "--out", str(tmp_path / "runs"), "--run-name", name),
                            env=_env(tmp_path), start_new_session=True, **pipes)


def _wait_for_the_first_epoch(launcher: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "epoch-0001" / "state.json").is_file():
        assert launcher.poll() is None and time.monotonic() < deadline, "the 2-process run ended before epoch 1"
        time.sleep(0.02)


def test_two_processes_killed_after_an_epoch_resume_in_one_to_the_same_lora(tmp_path, one_process_run):
    run = tmp_path / "runs" / "killed"
    launcher = _start_two_processes(tmp_path, "killed", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_the_first_epoch(launcher, run)
    finally:
        _kill_all(launcher, str(tmp_path / "runs"))  # the launcher and both processes, as an out-of-memory kill would
    assert checkpoint_epoch(latest_checkpoint(run)) < 3  # epochs are left for the single process to train
    resumed = subprocess.run(_train_command(1, "--resume", str(run), "--quiet"), env=_env(tmp_path),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_same_lora(run, one_process_run)
    _assert_close(_numbers(run), _numbers(one_process_run))


@pytest.mark.parametrize("count, processes, shares", [
    (4, 2, [(0, 2), (2, 4)]),
    (3, 2, [(0, 2), (2, 3)]),  # uneven: the first processes take one more
    (7, 3, [(0, 3), (3, 5), (5, 7)]),
    (1, 2, [(0, 1), (1, 1)]),  # an evaluation set smaller than the process count: the last gets nothing
])
def test_prompts_are_shared_out_in_contiguous_parts_that_cover_them_once(count, processes, shares):
    world = [Processes(rank, processes) for rank in range(processes)]
    assert [(p.share(count).start, p.share(count).stop) for p in world] == shares


def test_ddpo_and_an_evaluation_set_smaller_than_the_process_count_train_as_one_process(tmp_path):
    # DDPO's per-prompt statistics come from the gathered rewards; one evaluation prompt leaves process 1 none
    flags = ("--objective", "ddpo", "--epochs", "2", "--eval-max-prompts", "1")
    one, two = _train(tmp_path, 1, "one", *flags), _train(tmp_path, 2, "two", *flags)
    _assert_same_lora(two, one, epoch=2)
    _assert_close(_numbers(two), _numbers(one))
    assert len(_numbers(two)[1]["seen"]["after"]["scores"]) == 2


def test_fewer_prompts_per_epoch_than_processes_is_refused_with_the_number_that_works():
    Processes(0, 2).check_prompts_per_epoch(2)
    with pytest.raises(ConfigError, match="prompts_per_epoch 1 is fewer than the 2 processes.*launch at most 1.*"
                                          "at least 2"):
        Processes(0, 2).check_prompts_per_epoch(1)
    assert "each sampling 2 or 1 of the 3 prompts" in Processes(0, 2).describe(3)
    assert "uneven" not in Processes(0, 2).describe(4)


def test_ctrl_c_under_the_launcher_stops_every_process_at_the_same_point_and_exports(tmp_path):
    run = tmp_path / "runs" / "stopped"
    launcher = _start_two_processes(tmp_path, "stopped", "--epochs", "50", stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_the_first_epoch(launcher, run)
        os.killpg(launcher.pid, signal.SIGINT)  # a terminal's Ctrl-C: the launcher forwards it to its processes
        output, _ = launcher.communicate(timeout=120)
    finally:
        _kill_all(launcher, str(tmp_path / "runs"))
    done = checkpoint_epoch(latest_checkpoint(run))
    assert 1 <= done < 50
    assert f"stopped after epoch {done}; LoRA so far: {run / 'prdp_stopped.safetensors'}" in output
    assert "SIGABRT" not in output and load_file(run / "prdp_stopped.safetensors")


@pytest.mark.parametrize("device, refused", [
    ("cuda:1", "would put all 2 processes on one GPU; set device to cuda"),
    ("mps", "several processes train on CUDA GPUs or on the CPU, not on mps"),
])
def test_several_processes_refuse_a_device_they_cannot_share(device, refused):
    assert Processes(1, 2).device(torch.device("cpu")) == torch.device("cpu")
    assert Processes().device(torch.device(device)) == torch.device(device)  # one process: as given
    with pytest.raises(ConfigError, match=refused):
        Processes(1, 2).device(torch.device(device))
