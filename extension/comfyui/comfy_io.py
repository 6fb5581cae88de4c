"""Everything the nodes need from ComfyUI, in one place: its folders, its device, its model cache, its progress bar
and its Interrupt button. This is the only file of the pack that imports `comfy` or `folder_paths`, so the test
double (tests/comfyui_double/) covers exactly this surface."""

from __future__ import annotations

import gc
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths

from prdp_core.errors import ConfigError

RUNS_SUBFOLDER = "prdp"  # runs live in ComfyUI's output folder, under output/prdp/<run>


def checkpoint_names() -> list[str]:
    """The checkpoint files ComfyUI lists (models/checkpoints and extra_model_paths.yaml)."""
    return folder_paths.get_filename_list("checkpoints")


def checkpoint_path(name: str) -> str:
    path = folder_paths.get_full_path("checkpoints", name)
    if path is None:
        raise ConfigError(f"checkpoint {name!r} is not in ComfyUI's checkpoints folder any more; refresh the page "
                          f"and pick another.")
    return path


def loras_folder() -> Path:
    """The first `loras` folder (models/loras), where LoraLoader finds the files after a refresh; made if missing
    (ComfyUI lists folders that need not exist, e.g. under a new --base-directory)."""
    folder = Path(folder_paths.get_folder_paths("loras")[0])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def output_folder() -> Path:
    return Path(folder_paths.get_output_directory())


def runs_folder() -> Path:
    return output_folder() / RUNS_SUBFOLDER


def torch_device() -> str:
    """ComfyUI's device (`--cpu`, `--cuda-device` and the rest already applied), as a string the engine accepts."""
    return str(comfy.model_management.get_torch_device())


def free_host_memory() -> None:
    """Ask ComfyUI to unload the models it holds and release its cache, before a training run needs the memory."""
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def release_memory() -> None:
    """After a run: collect the run's pipeline and give the cached blocks back, for ComfyUI's next models."""
    gc.collect()
    comfy.model_management.soft_empty_cache()


def interrupted() -> bool:
    """Whether the user pressed Interrupt (polled without clearing it)."""
    return comfy.model_management.processing_interrupted()


def raise_interrupted() -> None:
    """End the node as interrupted, as ComfyUI's own nodes do."""
    raise comfy.model_management.InterruptProcessingException()


class ProgressBar:
    """The node's progress bar and preview image. ComfyUI's progress hook raises InterruptProcessingException once
    the user has pressed Interrupt; `update` returns False instead, so the caller can stop the run cleanly."""

    STEPS = 1000

    def __init__(self):
        self._bar = comfy.utils.ProgressBar(self.STEPS)

    def update(self, fraction: float, preview=None) -> bool:
        value = round(min(max(fraction, 0.0), 1.0) * self.STEPS)
        try:
            self._bar.update_absolute(value, self.STEPS, ("JPEG", preview, 512) if preview is not None else None)
        except comfy.model_management.InterruptProcessingException:
            return False
        return True
