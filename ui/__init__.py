"""The Gradio tab (installed as `prdp_ui`): `build_tab(HostContext(...))` for hosts, `prdp ui` standalone."""

from .tab import HostContext, TabState, build_tab, discover_models

__all__ = ["HostContext", "TabState", "build_tab", "discover_models"]
