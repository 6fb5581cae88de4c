"""The install hook (install.py) and the node pack's requirements.txt: only what is missing gets installed, and
nothing already installed can move."""

import importlib.util
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
HOST_OWNED = {"torch", "torchvision", "torchaudio", "gradio"}


@pytest.fixture
def install():
    spec = importlib.util.spec_from_file_location("prdp_install_hook", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_never_name_what_the_host_owns_and_are_met_here(install):
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    names = {Requirement(line).name.lower() for line in lines if line.strip() and not line.startswith("#")}
    assert names and not names & HOST_OWNED
    assert install.unmet(lines) == ([], [])  # the test environment has everything (pyproject asks for more)


def test_only_missing_requirements_are_installed_with_everything_else_held(install, tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\npeft>=0.1\nno-such-distribution-xyz>=1  # missing\npeft>=999\n"
                            'tomli>=2.0; python_version < "3.0"\n')
    calls = []

    def pip(command, **kwargs):
        constraints = Path(command[command.index("-c") + 1]).read_text()
        calls.append((command, constraints))
        return subprocess.CompletedProcess(command, 0)
    monkeypatch.setattr(install, "REQUIREMENTS", requirements)
    monkeypatch.setattr(install.subprocess, "run", pip)
    assert install.main() == 0
    (command, constraints), = calls
    assert command[-1] == "no-such-distribution-xyz>=1" and command[1:4] == ["-m", "pip", "install"]
    import torch

    assert f"torch=={torch.__version__}\n" in constraints  # pip may not move the host's torch
    missing, outdated = install.unmet(requirements.read_text().splitlines())
    assert missing == ["no-such-distribution-xyz>=1"] and outdated[0].startswith("peft>=999 (installed: ")

    calls.clear()
    requirements.write_text("peft>=0.1\n")
    assert install.main() == 0 and calls == []  # all there: no pip at all


def test_installed_with_pip_the_project_claims_no_generic_top_level_names():
    """`pip install -e .` installs the engine and the tab; the node pack's root files and folders stay out."""
    import importlib.metadata

    distribution = importlib.metadata.distribution("prdp-lora")
    assert set(distribution.read_text("top_level.txt").split()) == {"prdp_core", "prdp_ui"}
    assert distribution.metadata["License-Expression"] == "Apache-2.0"
