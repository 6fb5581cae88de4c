"""Test double of the webui's `modules` package (see ../README.md)."""
