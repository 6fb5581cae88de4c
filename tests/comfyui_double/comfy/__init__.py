"""Test double of the `comfy` package: only the modules the node pack imports (see ../README.md)."""
