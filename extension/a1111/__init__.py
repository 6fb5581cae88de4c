"""The A1111/Forge extension: scripts/prdp_lora.py calls `register()`; host.py is the only file that touches the
webui."""

from .host import register

__all__ = ["register"]
