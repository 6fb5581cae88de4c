"""The ComfyUI node pack (the repository root's __init__.py re-exports these mappings for custom_nodes/)."""

from .. import import_engine

import_engine()

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402  (needs the engine importable)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
