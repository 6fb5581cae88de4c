"""Test double of comfy.utils' progress bar: updates go to a global hook, which ComfyUI's server sets (main.py).

The hook installed here behaves as the server's does in the parts a node can observe: it records every update, and
raises InterruptProcessingException (clearing the flag) once Interrupt was pressed."""

from . import model_management

updates: list[tuple[int, int, object]] = []  # (value, total, preview) as the server would receive them


def _server_hook(value, total, preview, node_id=None):
    model_management.throw_exception_if_processing_interrupted()
    updates.append((value, total, preview))


PROGRESS_BAR_HOOK = _server_hook


class ProgressBar:
    def __init__(self, total, node_id=None):
        self.total, self.current, self.node_id = total, 0, node_id

    def update_absolute(self, value, total=None, preview=None):
        if total is not None:
            self.total = total
        self.current = min(value, self.total)
        if PROGRESS_BAR_HOOK is not None:
            PROGRESS_BAR_HOOK(self.current, self.total, preview, node_id=self.node_id)

    def update(self, value):
        self.update_absolute(self.current + value)
