"""Host glue (ComfyUI nodes, A1111/Forge tab) over the engine, importable from a clone inside a host's folder.

A host imports this repository as a folder (ComfyUI: custom_nodes/<pack>/__init__.py), not as an installed package,
so the engine beside it is not on sys.path. `import_engine` registers it under its own name, `prdp_core`, without
putting the repository root on sys.path, where its generic folder names (ui, scripts, tests) would shadow other
packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ENGINE_DIR = Path(__file__).resolve().parent.parent / "prdp_core"


def import_engine() -> None:
    """Make `import prdp_core` load the engine of this checkout (a no-op where it is already imported)."""
    if "prdp_core" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("prdp_core", ENGINE_DIR / "__init__.py",
                                                  submodule_search_locations=[str(ENGINE_DIR)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["prdp_core"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["prdp_core"]
        raise
