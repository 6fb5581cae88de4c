"""The PRDP tab inside A1111 and Forge: the tab's HostContext from the webui (its checkpoints, Lora folder, outputs
folder, device and queue lock), the hand-over of the GPU around a run, the settings section, and the registration.
The only file that imports the webui's `modules`.

A run holds the webui's `queue_lock` from start to end, so the webui's generations wait in its queue instead of
running out of memory beside the training; inside the lock the webui's loaded model leaves the GPU (A1111: to the
CPU, Forge: its memory manager unloads everything) and comes back after the run or its stop."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import sys
from pathlib import Path

from modules import call_queue, devices, paths, script_callbacks, sd_models, shared

from .. import import_tab

TITLE = "PRDP LoRA"
ELEM_ID = "prdp_lora"
SECTION = ("prdp_lora", TITLE)
OPT_OUTPUT_DIR, OPT_PRECISION, OPT_LOW_VRAM = "prdp_output_dir", "prdp_precision", "prdp_low_vram"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")  # auto: fp16 on a CUDA device, else fp32
log = logging.getLogger("prdp")


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None


# ---------------------------------------------------------------------------------------------- the GPU hand-over
def release_host_model():
    """Free the GPU memory the webui's model holds; returns what `restore_host_model` needs to bring it back."""
    if is_forge():  # Forge moves models itself: unload them all now, it loads what a generation needs again
        try:
            from backend import memory_management  # Forge 2 (since 2024-08)
        except ImportError:  # Forge 1: the same functions in its ComfyUI port
            from ldm_patched.modules import model_management as memory_management

        memory_management.unload_all_models()
        memory_management.soft_empty_cache()
        return None
    model = sd_models.model_data.sd_model  # not shared.sd_model, which loads a model when none is loaded
    if model is not None:
        sd_models.unload_model_weights(model)  # A1111: to the CPU, as Settings > Actions > Unload does
        devices.torch_gc()
    return model


def restore_host_model(model) -> None:
    if model is None:
        return
    try:
        sd_models.send_model_to_device(model)  # A1111's "Load SD checkpoint to VRAM from RAM"
    except Exception:  # the run's result stands; the webui's model waits on the CPU for the user
        log.exception("PRDP could not move the webui's model back to the GPU; use Settings > Actions > Load SD "
                      "checkpoint to VRAM from RAM")


@contextlib.contextmanager
def hold_gpu():
    """The GPU for one run: the webui's queue lock, with its model moved out of the way and back afterwards."""
    with call_queue.queue_lock:
        model = release_host_model()
        try:
            yield
        finally:
            restore_host_model(model)


# ---------------------------------------------------------------------------------------------- the context
def checkpoints() -> list[str]:
    """The webui's checkpoint files (its list, which includes --ckpt-dir), else those found in its folders."""
    from prdp_core.models import BUILTIN_MODELS
    from prdp_ui import discover_models

    files = sorted({info.filename for info in sd_models.checkpoints_list.values()})
    if files:
        return [*BUILTIN_MODELS, *files]
    return discover_models(shared.cmd_opts.ckpt_dir or Path(paths.models_path) / "Stable-diffusion")


def lora_dir() -> Path:
    return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora")


def form_defaults() -> dict:
    """The tab's starting values that the webui's settings fix."""
    from prdp_core.config import LOW_VRAM

    defaults = dict(LOW_VRAM) if getattr(shared.opts, OPT_LOW_VRAM, False) else {}
    precision = getattr(shared.opts, OPT_PRECISION, "auto")
    if precision != "auto":
        defaults["precision"] = precision
    elif "precision" not in defaults:
        defaults["precision"] = "fp16" if str(devices.device).startswith("cuda") else "fp32"
    return defaults


def refresh_loras(path: Path) -> None:
    """Make the webui's Lora list know the new file, so `<lora:name:1>` works before the Lora tab is refreshed."""
    networks = sys.modules.get("networks")  # the built-in Lora extension's module (A1111 and Forge)
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


def host_context():
    from prdp_ui import HostContext

    output_dir = getattr(shared.opts, OPT_OUTPUT_DIR, "") or Path(paths.data_path) / "outputs" / "prdp"
    return HostContext(models=checkpoints(), lora_dir=lora_dir(), output_dir=Path(output_dir),
                       device=str(devices.device), gpu_lock=hold_gpu, defaults=form_defaults(),
                       after_export=refresh_loras)


# ---------------------------------------------------------------------------------------------- registration
def add_settings() -> None:
    import gradio as gr

    options = {
        OPT_OUTPUT_DIR: shared.OptionInfo("", "Folder for PRDP runs (empty: outputs/prdp in the webui folder)"),
        OPT_PRECISION: shared.OptionInfo("auto", "Base-model precision the PRDP tab starts with (auto: fp16 on a GPU, "
                                             "fp32 on the CPU)", gr.Radio, {"choices": list(PRECISIONS)}),
        OPT_LOW_VRAM: shared.OptionInfo(False, "PRDP tab starts with the low-VRAM settings (fp16, micro-batch 1, "
                                                  "gradient checkpointing, tiled decoding, models offloaded)"),
    }
    for key, info in options.items():
        info.section = SECTION
        shared.opts.add_option(key, info.needs_reload_ui())


@functools.cache
def run_session():
    """The one RunSession of this webui process, kept when Reload UI builds the tab again."""
    from prdp_core.session import RunSession

    return RunSession(gpu_lock=hold_gpu)


def ui_tabs() -> list:
    try:
        import_tab()
        # the libraries a run needs, imported now so that a conflict shows here and not at the first start
        import peft  # noqa: F401
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline  # noqa: F401
        from prdp_ui import build_tab

        blocks = build_tab(host_context(), run_session())
    except Exception as exc:  # the webui must keep starting: the tab says what is wrong instead
        log.warning("PRDP tab unavailable", exc_info=True)
        blocks = message_tab(dependency_message(exc))
    return [(blocks, TITLE, ELEM_ID)]


def dependency_message(exc: Exception) -> str:
    from prdp_core.errors import library_reason  # the standard library only: it loads when the others do not

    reason = f"{type(exc).__name__}: {library_reason(exc)}"
    installer = Path(__file__).resolve().parents[2] / "install.py"
    return (f"The PRDP tab could not load its libraries ({reason}); run `\"{sys.executable}\" \"{installer}\"`, which "
            f"installs what is missing at versions that work with this webui's pinned libraries, then restart the "
            f"webui.")


def message_tab(text: str):
    import gradio as gr

    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.Markdown(text, elem_id="prdp_unavailable")
    return blocks


def run_status() -> dict:
    """GET /prdp-lora/status, for javascript/prdp_lora.js: whether a PRDP run holds the webui's queue lock."""
    return {"running": run_session.cache_info().currsize > 0 and run_session().running}  # no tab, no run


def add_routes(demo, app) -> None:
    app.add_api_route("/prdp-lora/status", run_status, methods=["GET"])


def register() -> None:
    script_callbacks.on_ui_settings(add_settings)
    script_callbacks.on_ui_tabs(ui_tabs)
    script_callbacks.on_app_started(add_routes)
