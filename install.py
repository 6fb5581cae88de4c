"""Install hook, run by A1111/Forge on every launch (extensions/<name>/install.py), by ComfyUI-Manager after it
installs requirements.txt, and by hand after a git clone (`python install.py` with the host's Python).

Installs the requirements (requirements.txt) that are missing, and nothing else: every distribution already in the
environment (torch, torchvision, gradio and whatever else the host pins) is held at its installed version with a pip
constraints file, so pip can add packages but never upgrade, downgrade or replace one. Where the host pins an older
library that newer diffusers or peft releases cannot import with (A1111 1.10: transformers 4.30.2, accelerate
0.21.0), the requirement is capped to the releases that can (HOST_CAPS). A requirement that is installed but older
than asked for is reported with the command that would upgrade it, for the user to decide. Under A1111 it goes
through the webui's own `launch.is_installed` / `launch.run_pip` (its index URL, its --skip-install). Fast and
idempotent: with everything in place it only reads package metadata."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tempfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # packaging is not installed: pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

REQUIREMENTS = Path(__file__).resolve().with_name("requirements.txt")
# (library the host pins, first release with an API that our requirement's newer releases import, the cap that holds
# while the installed release is older); measured by importing each release beside A1111 1.10's and Forge's pins
HOST_CAPS = (
    ("transformers", "4.37", "diffusers<0.32"),  # diffusers 0.32+ imports transformers.SiglipImageProcessor
    ("transformers", "4.36", "peft<0.14"),  # peft 0.14+ imports transformers.Cache
    ("accelerate", "0.32", "peft<0.15"),  # peft 0.15+ imports accelerate.utils.memory.clear_device_cache
)


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


def with_host_caps(line: str) -> str:
    """The requirement `line` narrowed by every HOST_CAPS cap that this environment's installed libraries call for."""
    requirement = Requirement(line)
    specifiers = [str(requirement.specifier)] if requirement.specifier else []
    for library, first_release, cap in HOST_CAPS:
        capped = Requirement(cap)
        if capped.name == requirement.name and _older_than(library, first_release):
            specifiers.append(str(capped.specifier))
    return requirement.name + ",".join(specifiers)


def _older_than(library: str, release: str) -> bool:
    try:
        return Version(importlib.metadata.version(library)) < Version(release)
    except importlib.metadata.PackageNotFoundError:  # pip installs a current release with the requirement
        return False


def installed_constraints() -> str:
    """A pip constraints file holding every installed distribution at its version."""
    pins = {dist.metadata["Name"]: dist.version for dist in importlib.metadata.distributions() if dist.metadata["Name"]}
    return "".join(f"{name}=={version}\n" for name, version in sorted(pins.items()))


def webui_launch():
    """A1111's / Forge's `launch` module when the webui runs this hook (it puts its root on PYTHONPATH), else None."""
    try:
        import launch
    except Exception:  # not a webui (ComfyUI-Manager, by hand): plain pip
        return None
    return launch if hasattr(launch, "run_pip") and hasattr(launch, "is_installed") else None


def main() -> int:
    launch = webui_launch()
    missing, outdated = unmet(REQUIREMENTS.read_text(encoding="utf-8").splitlines())
    if launch is not None:  # the webui's own notion of installed (a module or a distribution of that name)
        missing = [line for line in missing if not launch.is_installed(Requirement(line).name)]
    for line in outdated:
        print(f"[prdp-lora] {line} is older than PRDP needs; it is left as the host installed it. Upgrade it "
              f"yourself if nothing else pins it: {sys.executable} -m pip install '{line.split(' (')[0]}'")
    if not missing:
        return 0
    wanted = [with_host_caps(line) for line in missing]
    print(f"[prdp-lora] installing {', '.join(wanted)} (packages already installed are held at their versions)")
    with tempfile.TemporaryDirectory() as folder:
        constraints = Path(folder) / "installed.txt"
        constraints.write_text(installed_constraints(), encoding="utf-8")
        if launch is not None:
            try:  # run_pip goes through a shell: quote the specifiers' < and >
                launch.run_pip(" ".join(["install", "-c", f'"{constraints}"', *(f'"{w}"' for w in wanted)]),
                               f"PRDP requirements: {', '.join(wanted)}")
                returncode = 0
            except RuntimeError:  # the webui printed pip's output; the PRDP tab repeats the sentence below
                returncode = 1
        else:
            command = [sys.executable, "-m", "pip", "install", "-c", str(constraints), *wanted]
            returncode = subprocess.run(command).returncode
    if returncode:
        print(f"[prdp-lora] could not install {', '.join(wanted)} without changing packages already installed "
              f"(see pip's message above); install them by hand with {sys.executable} -m pip install, then restart.")
    # the webui keeps starting either way; its PRDP tab then says what is missing
    return 0 if launch is not None else returncode


if __name__ == "__main__":
    sys.exit(main())
