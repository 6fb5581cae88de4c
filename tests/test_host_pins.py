"""The engine under each webui's own pinned libraries: for every venv in PRDP_HOST_PYTHONS (built by .ci/run from
.ci/hosts/<host>.txt, the webui's pins, then install.py as the webui runs it), the pins are what is installed, and
the core path passes there: a toy training, export, diffusers reloading the export (where that webui's transformers
lets diffusers load LoRAs), and the extension against the webui double (tab built by the webui's Gradio, a run under
the queue lock, export with the card, install.py). Skipped when PRDP_HOST_PYTHONS is unset (CI sets it)."""

import os
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PYTHONS = os.environ.get("PRDP_HOST_PYTHONS", "").split()
CORE_PATH = ["tests/test_training.py::test_events_and_metrics", "tests/test_export.py", "tests/test_a1111.py",
             "tests/test_ui.py::test_run_poll_export_and_reload_in_diffusers"]
pytestmark = pytest.mark.skipif(not PYTHONS, reason="PRDP_HOST_PYTHONS names no host venv (.ci/run builds them)")


def _host(python: str) -> str:
    return Path(python).parents[1].name.rsplit("-", 1)[-1]  # .venv-a1111/bin/python -> a1111


@pytest.mark.parametrize("python", PYTHONS, ids=_host)
def test_the_webuis_pins_are_what_is_installed(python):
    pins = [Requirement(line) for line in (ROOT / ".ci" / "hosts" / f"{_host(python)}.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    script = "import importlib.metadata as m, sys; print('\\n'.join(m.version(n) for n in sys.argv[1:]))"
    installed = subprocess.run([python, "-c", script, *(pin.name for pin in pins)], capture_output=True, text=True,
                               check=True).stdout.split()
    unmet = {pin.name: version for pin, version in zip(pins, installed) if not pin.specifier.contains(version)}
    assert len(installed) == len(pins) and unmet == {}


@pytest.mark.slow
@pytest.mark.parametrize("python", PYTHONS, ids=_host)
def test_core_path_passes_under_the_webuis_pins(python, tmp_path):
    result = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path),
                             "-rs", *CORE_PATH], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=1500)
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout.splitlines()[-1]
