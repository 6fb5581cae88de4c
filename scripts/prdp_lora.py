"""A1111/Forge entry point: the webui imports extensions/<name>/scripts/*.py at start; this registers the PRDP tab.

The extension's glue is loaded under its own name (prdp_extension), so that no other extension's `extension` package
can shadow it, and so that nothing of this repository goes on sys.path."""

import importlib.util
import sys
from pathlib import Path

if "prdp_extension" not in sys.modules:
    _folder = Path(__file__).resolve().parents[1] / "extension"
    _spec = importlib.util.spec_from_file_location("prdp_extension", _folder / "__init__.py",
                                                   submodule_search_locations=[str(_folder)])
    sys.modules["prdp_extension"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["prdp_extension"])

from prdp_extension.a1111 import register  # noqa: E402

register()
