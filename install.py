"""Install hook, run by ComfyUI-Manager after it installs requirements.txt, and by hand after a git clone
(`python install.py` with the host's Python).

Installs the requirements (requirements.txt) that are missing, and nothing else: every distribution already in the
environment (torch, torchvision, gradio and whatever else the host pins) is held at its installed version with a pip
constraints file, so pip can add packages but never upgrade, downgrade or replace one. A requirement that is
installed but older than asked for is reported with the command that would upgrade it, for the user to decide. Fast
and idempotent: with everything in place it only reads package metadata."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # packaging is not installed: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

REQUIREMENTS = Path(__file__).resolve().with_name("requirements.txt")


def unmet(lines: list[str]) -> tuple[list[str], list[str]]:
    """(missing, outdated): the requirement lines that apply to this Python and are not installed, or installed at
    a version the requirement does not allow."""
    missing, outdated = [], []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(line)
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            outdated.append(f"{line} (installed: {version})")
    return missing, outdated


def installed_constraints() -> str:
    """A pip constraints file holding every installed distribution at its version."""
    pins = {dist.metadata["Name"]: dist.version for dist in importlib.metadata.distributions() if dist.metadata["Name"]}
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def main() -> int:
    missing, outdated = unmet(REQUIREMENTS.read_text(encoding="utf-8").splitlines())
    for line in outdated:
        print(f"[prdp-lora] {line} is older than the node pack needs; it is left as the host installed it. Upgrade "
              f"it yourself if nothing else pins it: {sys.executable} -m pip install '{line.split(' (')[0]}'")
    if not missing:
        return 0
    print(f"[prdp-lora] installing {', '.join(missing)} (packages already installed are held at their versions)")
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "installed.txt"
        constraints.write_text(installed_constraints(), encoding="utf-8")
        result = subprocess.run([sys.executable, "-m", "pip", "install", "-c", str(constraints), *missing])
    if result.returncode:
        print(f"[prdp-lora] could not install {', '.join(missing)} without changing packages already installed "
              f"(see pip's message above); install them by hand with {sys.executable} -m pip install, then restart.")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
