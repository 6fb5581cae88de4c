"""The A1111/Forge extension, imported as the webui imports it (scripts/prdp_lora.py), against the test double of the
webui surface it touches (tests/a1111_double): the tab is registered with the webui's folders, device and settings;
a run holds the webui's queue lock with its model moved off the GPU and back; an export lands in the Lora folder
with its card and refreshes the webui's Lora list; missing libraries give a tab that says how to fix them; and
install.py goes through the webui's launch module, capped to releases the webui's pins can import."""

import importlib.util
import re
import sys
import time
import types
from pathlib import Path

import pytest

from prdp_core.config import LOW_VRAM

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = Path(__file__).resolve().parent / "a1111_double"
DOUBLE_MODULES = ("modules", "modules_forge", "backend", "launch", "networks", "prdp_extension", "prdp_lora_script")


class HostModel:
    """The webui's loaded SD model: where it is, and whether the queue lock was held at each move."""

    def __init__(self, lock):
        self.device, self.moves, self._lock = "cuda", [], lock

    def to(self, device):
        self.device = str(device)
        self.moves.append((self.device, self._lock.locked()))
        return self


@pytest.fixture
def webui(tmp_path):
    """The extension loaded by the double's webui (data folder tmp_path, one checkpoint, the Lora folder from
    --lora-dir); yields the double's modules; everything is unloaded afterwards."""
    sys.path.insert(0, str(DOUBLE))
    try:
        from modules import paths, script_callbacks, sd_models, shared

        paths.data_path, paths.models_path = str(tmp_path), str(tmp_path / "models")
        checkpoint = tmp_path / "models" / "Stable-diffusion" / "dreamy.safetensors"
        sd_models.checkpoints_list[checkpoint.name] = sd_models.CheckpointInfo(str(checkpoint))
        shared.cmd_opts.lora_dir = str(tmp_path / "models" / "Lora")
        # the webui's script loader: the file under a name of its own
        spec = importlib.util.spec_from_file_location("prdp_lora_script", ROOT / "scripts" / "prdp_lora.py")
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
        from modules import devices

        yield types.SimpleNamespace(base=tmp_path, checkpoint=checkpoint, paths=paths, shared=shared,
                                    sd_models=sd_models, devices=devices, callbacks=script_callbacks)
    finally:
        sys.path.remove(str(DOUBLE))
        for module in list(sys.modules):
            if module.split(".")[0] in DOUBLE_MODULES:
                del sys.modules[module]


def tab_state(webui):
    webui.callbacks.ui_settings_callback()
    (blocks, title, elem_id), = webui.callbacks.ui_tabs_callback()
    assert (title, elem_id) == ("PRDP LoRA", "prdp_lora")
    return blocks, blocks.prdp_state


def test_tab_is_registered_with_the_webuis_folders_device_and_settings(webui):
    blocks, state = tab_state(webui)
    context = state.context
    assert context.models[0] == "builtin:toy" and str(webui.checkpoint) in context.models
    assert context.lora_dir == webui.base / "models" / "Lora"
    assert context.output_dir == webui.base / "outputs" / "prdp"
    assert context.device == "cpu" and context.defaults == {"precision": "fp32"}  # auto on the CPU

    labels = webui.shared.opts.data_labels
    assert {key: info.section for key, info in labels.items()} == dict.fromkeys(
        ["prdp_output_dir", "prdp_precision", "prdp_low_vram"], ("prdp_lora", "PRDP LoRA"))


def test_settings_set_the_forms_starting_values(webui):
    webui.callbacks.ui_settings_callback()
    webui.shared.opts.prdp_low_vram = True
    webui.shared.opts.prdp_output_dir = str(webui.base / "elsewhere")
    (blocks, _, _), = webui.callbacks.ui_tabs_callback()
    assert blocks.prdp_state.context.defaults == LOW_VRAM
    assert blocks.prdp_state.context.output_dir == webui.base / "elsewhere"
    values = {block.elem_id: block.value for block in blocks.blocks.values() if getattr(block, "elem_id", None)}
    assert values["prdp_batch_size"] == 1 and values["prdp_precision"] == "fp16"

    webui.shared.opts.prdp_precision = "bf16"  # an explicit precision wins over low-VRAM's fp16
    (blocks, _, _), = webui.callbacks.ui_tabs_callback()
    assert blocks.prdp_state.context.defaults["precision"] == "bf16"


def test_a_run_holds_the_queue_lock_with_the_host_model_moved_away_and_back(webui, tiny_config):
    from modules import call_queue

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    _, state = tab_state(webui)
    app = FastAPI()
    webui.callbacks.app_started_callback(None, app)
    status = TestClient(app)  # what javascript/prdp_lora.js asks while a generation waits in the queue
    webui.devices.device = "cuda"  # where the webui's model lives and returns to
    model = webui.sd_models.model_data.sd_model = HostModel(call_queue.queue_lock)
    assert status.get("/prdp-lora/status").json() == {"running": False}
    state.session.start(tiny_config)
    held, reported = [], status.get("/prdp-lora/status").json()
    while state.session.running:
        snapshot = state.session.snapshot()
        if snapshot.status == "running" and snapshot.run_dir:  # the trainer runs: from its first event to its last
            held.append(call_queue.queue_lock.locked())
        time.sleep(0.05)
    assert state.session.snapshot().status == "finished" and reported == {"running": True}
    assert len(held) > 3 and all(held)
    assert model.moves == [("cpu", True), ("cuda", True)]  # off the GPU, then back, both under the lock
    assert not call_queue.queue_lock.locked()  # the webui's generations run again
    assert status.get("/prdp-lora/status").json() == {"running": False}
    _, rebuilt = tab_state(webui)  # Reload UI: the new tab shows the same session, and its finished run
    assert rebuilt.session is state.session and rebuilt.poll().status.startswith("<b>finished</b>")


def test_a_run_waits_for_the_webuis_generation_and_a_failed_one_gives_the_gpu_back(webui, tiny_config):
    from modules import call_queue

    _, state = tab_state(webui)
    webui.devices.device = "cuda"
    model = webui.sd_models.model_data.sd_model = HostModel(call_queue.queue_lock)
    with call_queue.queue_lock:  # the webui is generating: the run waits, and says so
        state.session.start(type(tiny_config).from_dict({**tiny_config.to_dict(), "model": str(webui.checkpoint)}))
        time.sleep(0.5)
        assert state.poll().status.startswith("<b>running</b> · waiting for the GPU") and model.moves == []
    state.session.wait(60)
    snapshot = state.session.snapshot()
    assert snapshot.status == "failed" and "dreamy.safetensors" in snapshot.error  # the file does not exist
    assert model.moves == [("cpu", True), ("cuda", True)] and not call_queue.queue_lock.locked()


def test_a_host_that_cannot_hand_over_its_gpu_fails_the_run_in_one_sentence(webui, tiny_config, monkeypatch):
    from modules import call_queue

    from prdp_extension.a1111 import host

    def out_of_memory():
        raise RuntimeError("CUDA error: out of memory")
    monkeypatch.setattr(host, "release_host_model", out_of_memory)
    _, state = tab_state(webui)
    state.session.start(tiny_config)
    state.session.wait(60)
    snapshot = state.session.snapshot()
    assert snapshot.status == "failed" and not call_queue.queue_lock.locked()
    assert snapshot.error == ("the host could not hand its GPU over to the run (RuntimeError: CUDA error: out of "
                              "memory); restart the host, then start again.")


def test_no_loaded_host_model_is_left_alone(webui):
    from prdp_extension.a1111 import host

    with host.hold_gpu():  # A1111's shared.sd_model would load a checkpoint here; model_data.sd_model does not
        assert webui.sd_models.model_data.sd_model is None


def test_export_lands_in_the_lora_folder_with_its_card_and_refreshes_the_webuis_list(webui, tiny_config):
    refreshed = []
    sys.modules["networks"] = types.SimpleNamespace(list_available_networks=lambda: refreshed.append(True))
    _, state = tab_state(webui)
    state.session.start(tiny_config)
    state.session.wait(120)
    message, path = state.export("sunny", "kohya", "fp16")
    lora = webui.base / "models" / "Lora" / "sunny.safetensors"
    assert path == str(lora) and message.text.endswith("`<lora:sunny:1>`.")
    assert lora.with_suffix(".json").is_file() and (lora.parent / "sunny.preview.png").is_file()
    assert refreshed == [True]
    assert state.export("../sunny", "kohya", "fp16")[0].text.startswith("Not exported: LoRA name")


def test_missing_libraries_give_a_tab_that_says_how_to_fix_them(webui, monkeypatch):
    from prdp_extension.a1111 import host

    def broken():
        raise ImportError("cannot import name 'SiglipImageProcessor' from 'transformers'")
    monkeypatch.setattr(host, "import_tab", broken)
    (blocks, title, _), = webui.callbacks.ui_tabs_callback()
    text, = [block.value for block in blocks.blocks.values() if getattr(block, "elem_id", None) == "prdp_unavailable"]
    assert title == "PRDP LoRA" and "SiglipImageProcessor" in text
    assert str(ROOT / "install.py") in text and text.count(". ") == 0  # one sentence


def test_forge_frees_the_gpu_through_its_memory_manager(webui):
    sys.path.insert(0, str(DOUBLE / "forge"))
    try:
        from backend import memory_management

        from prdp_extension.a1111 import host

        assert host.is_forge()
        with host.hold_gpu():
            assert memory_management.calls == ["unload_all_models", "soft_empty_cache"]
        assert memory_management.calls == ["unload_all_models", "soft_empty_cache"]  # Forge reloads on demand
    finally:
        sys.path.remove(str(DOUBLE / "forge"))



# ---------------------------------------------------------------------------------------------- install.py
@pytest.fixture
def install_under_webui(monkeypatch):
    """install.py as the webui runs it (its launch module importable), with A1111 1.10's transformers and
    accelerate, and neither diffusers nor peft installed."""
    sys.path.insert(0, str(DOUBLE))
    spec = importlib.util.spec_from_file_location("prdp_install_hook", ROOT / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    real_version = install.importlib.metadata.version
    host = {"transformers": "4.30.2", "accelerate": "0.21.0"}

    def version(name):
        if name in ("diffusers", "peft"):
            raise install.importlib.metadata.PackageNotFoundError(name)
        return host.get(name) or real_version(name)
    monkeypatch.setattr(install.importlib.metadata, "version", version)
    import launch

    yield install, launch
    sys.path.remove(str(DOUBLE))
    del sys.modules["launch"]


def test_install_goes_through_the_webuis_pip_capped_to_what_its_pins_import(install_under_webui):
    install, launch = install_under_webui
    calls = []

    def run_pip(command, desc=None):
        constraints_file, *requirements = re.findall(r'"([^"]+)"', command)  # quoted: run_pip goes through a shell
        calls.append((command.split()[:2], requirements, Path(constraints_file).read_text()))
    launch.run_pip = run_pip
    assert install.main() == 0
    (verb, requirements, held), = calls
    assert verb == ["install", "-c"] and requirements == ["diffusers>=0.31,<0.32", "peft>=0.13,<0.14,<0.15"]
    import torch

    assert f"torch=={torch.__version__}\n" in held  # pip may add packages, never move the webui's


def test_install_does_nothing_when_the_webui_has_everything(install_under_webui):
    install, launch = install_under_webui
    launch.installed.update({"diffusers", "peft"})
    launch.pip_commands.clear()
    assert install.main() == 0 and launch.pip_commands == []


def test_host_caps_only_narrow_the_libraries_they_name(install_under_webui):
    install, _ = install_under_webui
    assert install.with_host_caps("diffusers>=0.31") == "diffusers>=0.31,<0.32"
    assert install.with_host_caps("accelerate>=0.21") == "accelerate>=0.21"
    assert install.with_host_caps('tomli>=2.0') == "tomli>=2.0"
