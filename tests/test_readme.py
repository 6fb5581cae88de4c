"""The README's two commands: the first sets up and trains, the second sets up and runs the tests, and CI runs
that second one as the README writes it."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command(which: str) -> str:
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "readme_command.py"), which], capture_output=True,
                          text=True, check=True).stdout.strip()


def test_the_readme_commands_set_up_then_train_or_test():
    main, test = _command("main"), _command("test")
    for command in (main, test):  # from a fresh clone: a venv of its own, CI's torch pin, the package
        assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && pip install -q torch==2.13.0")
    assert main.endswith("&& pip install -q -e . && prdp train")
    assert test.endswith("&& HF_HUB_OFFLINE=1 python -m pytest -q")


def test_ci_runs_the_readme_test_command():
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-2:] == ['readme_test_command=$(python3 .ci/readme_command.py test)',
                       'eval "$readme_test_command"']  # the last thing CI does
