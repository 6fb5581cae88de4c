"""Host glue (ComfyUI nodes, A1111/Forge tab) over the engine, importable from a clone inside a host's folder.

A host imports this repository as a folder (ComfyUI: custom_nodes/<pack>/__init__.py, A1111: extensions/<name>/
scripts/*.py), not as an installed package, so the engine and the tab beside it are not on sys.path. `import_engine`
and `import_tab` register them under their installed names, `prdp_core` and `prdp_ui`, without putting the
repository root on sys.path, where its generic folder names (ui, scripts, tests) would shadow other packages."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _register(name: str, folder: Path) -> None:
    if name in sys.modules:  # already imported (an installed package, or an earlier call)
        return
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise


def import_engine() -> None:
    """Make `import prdp_core` load the engine of this checkout (a no-op where it is already imported)."""
    _register("prdp_core", ROOT / "prdp_core")


def import_tab() -> None:
    """Make `import prdp_ui` load the Gradio tab of this checkout (the repository's ui/ folder), engine included."""
    import_engine()
    _register("prdp_ui", ROOT / "ui")
