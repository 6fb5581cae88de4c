"""ComfyUI entry point: ComfyUI imports custom_nodes/<this folder>/__init__.py and reads these mappings.

Installed with pip (`pip install -e .`) this file is not part of the package; it matters only as a node pack."""

try:
    import folder_paths  # noqa: F401  (ComfyUI's own module: present exactly when ComfyUI imports this folder)
except ImportError:  # imported as a plain package elsewhere (pytest collects this folder as one): no host, no nodes
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}
else:
    from .extension.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
