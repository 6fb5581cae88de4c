"""The Gradio tab: the form <-> config mapping, the callbacks (run, stop, resume, export, config files) driven as the
tab drives them, and the Blocks wiring under the installed Gradio."""

import inspect
from pathlib import Path

import pytest
import torch

from conftest import needs_diffusers_lora_loading
from prdp_core.config import TrainConfig
from prdp_core.errors import ConfigError
from prdp_ui.form import FIELDS, OWN_WIDGETS, config_to_form, from_widget, prompt_source
from prdp_ui.tab import UNCHANGED, HostContext, Notice, TabState, discover_models


@pytest.fixture
def tab(tmp_path):
    return TabState(HostContext(models=["builtin:tiny"], lora_dir=tmp_path / "loras", output_dir=tmp_path / "runs"))


def form_of(state: TabState, config: TrainConfig) -> tuple:
    values, weights = config_to_form(config, FIELDS, state.rewards)
    return values, weights, config.prompts, "", None


def test_every_setting_has_one_widget_in_the_tab():
    pytest.importorskip("gradio")
    from prdp_ui import build_tab

    ids = [getattr(block, "elem_id", None) for block in build_tab(HostContext()).blocks.values()]
    shown = {name for name in TrainConfig().to_dict() if f"prdp_{name}" in ids}
    assert shown | set(OWN_WIDGETS) == set(TrainConfig().to_dict())  # the host decides the others, or own widgets
    assert all(ids.count(f"prdp_{name}") == 1 for name in shown)


def test_form_round_trip(tab, tmp_path):
    config = TrainConfig(model="builtin:tiny", lora_targets=["to_q", "to_v"], gradient_checkpointing=True,
                         rewards={"jpeg_compressibility": 1.0, "http": 0.5},
                         reward_options={"http": {"url": "http://127.0.0.1:9/score", "timeout": 5}},
                         learning_rate=3e-4, epochs=3,
                         precision="bf16", output_dir=str(tmp_path / "runs"))
    assert tab.config(*form_of(tab, config)) == TrainConfig.from_dict({**config.to_dict(), "device": "auto"})


@pytest.mark.parametrize("name, value, message", [
    ("epochs", 2.5, "whole number"), ("epochs", None, "is empty"), ("learning_rate", "", "is empty"),
    ("reward_options", "{http: 1}", "must be JSON")])
def test_widget_values_that_are_not_the_field_type(name, value, message):
    with pytest.raises(ConfigError, match=message):
        from_widget(name, value)


def test_prompt_sources(tmp_path):
    upload = tmp_path / "mine.txt"
    assert prompt_source("builtin:animals", "a cat", str(upload), tmp_path) == str(upload)
    typed = prompt_source("builtin:animals", " a red fox \n\n an owl at night\n", None, tmp_path)
    assert open(typed).read() == "a red fox\nan owl at night\n"
    assert prompt_source("builtin:animals", "  ", None, tmp_path) == "builtin:animals"
    with pytest.raises(ConfigError, match="no training prompts"):
        prompt_source("", "", None, tmp_path)


def test_bad_form_is_a_message_not_an_exception(tab, tiny_config):
    values, weights, *prompts = form_of(tab, tiny_config)
    values[FIELDS.index("epochs")] = 0
    assert tab.start(values, weights, *prompts).text.startswith("Not started: epochs")
    assert tab.start(values, [0.0] * len(weights), *prompts).kind == "error"  # no reward picked
    assert tab.stop() == Notice("warning", "No run in progress.")
    assert tab.export("x", "kohya", "fp16") == (Notice("warning", "Export needs a finished or stopped run."),
                                                UNCHANGED)
    assert tab.estimate(values, weights, *prompts).startswith("Cannot estimate this run yet: epochs")


@needs_diffusers_lora_loading
def test_run_poll_export_and_reload_in_diffusers(tab, tiny_config):
    from prdp_core.models import load_pipeline

    assert tab.estimate(*form_of(tab, tiny_config)).startswith("<b>time</b>: shown once the run starts")
    assert tab.start(*form_of(tab, TrainConfig.from_dict({**tiny_config.to_dict(), "epochs": 2}))) == \
        Notice("success", "Started.")
    busy = tab.run_message(tab.start(*form_of(tab, tiny_config)))
    assert busy.kind == "warning" and busy.text.startswith("Not started: a training run is already in progress")
    running = tab.poll()
    assert running.message is UNCHANGED  # true while the run goes on
    assert running.controls == (False, True, False, False)  # only stop can act during a run
    assert tab.session.wait(600)
    view = tab.poll()
    assert view.status.startswith("<b>finished</b> · 2 of 2 epochs · ")
    assert view.message == ""  # the run ended: "already in progress" is cleared
    assert view.controls == (True, False, True, True)
    assert view.curve.size[0] > 100 and view.gallery and view.before_after.endswith("before_after.png")
    assert "epoch 2/2" in view.log
    again = tab.poll(view.key)  # nothing new: the pictures and buttons are not re-sent
    assert again[2:7] == (UNCHANGED,) * 5 and again.key == view.key
    assert view.estimate.startswith("<b>about ")  # the run that ended measured this machine's pace
    assert tab.poll().estimate is UNCHANGED

    assert tab.export("../escape", "kohya", "fp16")[0].text.startswith("Not exported: LoRA name")
    assert tab.export(" ", "kohya", "fp16") == (Notice("error", "Not exported: LoRA name is empty; give it a name."),
                                               UNCHANGED)
    message, path = tab.export("my_lora", "kohya", "fp16")
    assert tab.export("my_lora", "kohya", "fp32") == (  # no silent overwrite; the link to the first file stays
        Notice("warning", f"Not exported: my_lora.safetensors already exists in {tab.context.lora_dir}; choose "
                          f"another name, or delete that file first."), UNCHANGED)
    assert message == Notice("success", f"Saved {path}; in a prompt of A1111 or Forge it is `<lora:my_lora:1>`.")
    assert path == str(tab.context.lora_dir / "my_lora.safetensors")
    pipe = load_pipeline("builtin:tiny")
    before = pipe.unet.conv_out.weight.sum().item()
    pipe.load_lora_weights(str(Path(path).parent), weight_name=Path(path).name)
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 32)
    with torch.no_grad():
        with_lora = pipe.unet(latents, 500, text).sample
        pipe.disable_lora()
        without = pipe.unet(latents, 500, text).sample
    assert pipe.unet.conv_out.weight.sum().item() == before
    assert (with_lora - without).abs().max() > 0  # the trained LoRA changes the UNet's output


def test_stop_and_resume_from_the_tab(tab, tiny_config):
    stopped = []

    def stop_at_first_epoch(snapshot):
        if snapshot.epoch == 1 and not stopped:
            stopped.append(tab.stop())
    tab.session._on_change = stop_at_first_epoch
    tab.start(*form_of(tab, TrainConfig.from_dict({**tiny_config.to_dict(), "epochs": 3})))
    assert tab.session.wait(600) and stopped[0].text.startswith("Stopping")
    assert tab.poll().status.startswith("<b>stopped</b> · 1 of 3 epochs")
    log, samples = tab.poll().log, tab.session.snapshot().samples
    values, weights, prompts, _, _ = form_of(tab, TrainConfig.load(tab.session.snapshot().run_dir / "config.toml"))
    assert tab.run_form() == [*values, *weights, prompts] and values[FIELDS.index("epochs")] == 3  # after a reload
    assert tab.resume("").text.startswith("Resuming ")  # empty: the last run
    assert tab.poll().log.startswith(log) and tab.session.snapshot().samples == samples  # the log and gallery stay
    assert tab.session.wait(600) and tab.poll().status.startswith("<b>finished</b> · 3 of 3 epochs")
    assert tab.resume(str(tab.context.output_dir / "nothing-here")).text.startswith("Not resumed: ")


def test_config_file_save_and_load(tab, tiny_config, tmp_path):
    config = TrainConfig.from_dict({**tiny_config.to_dict(), "epochs": 7, "rewards": {"aesthetic": 1.0},
                                    "reward_options": {"aesthetic": {"head": "/models/sac_logos_ava1-l14.pth"}}})
    form = form_of(tab, config)
    message, path = tab.save_config(*form)
    assert message == Notice("success", f"Saved {path}.")
    message, loaded = tab.load_config(path)
    assert message == Notice("success", "Loaded prdp_config.toml.")
    assert loaded == [*form[0], *form[1], tiny_config.prompts]
    assert TrainConfig.load(path).reward_options == config.reward_options  # the options survive the file
    broken = tmp_path / "gradio-temp-copy" / "broken.toml"  # Gradio 4+ hands over a copy with the user's name
    broken.parent.mkdir()
    broken.write_text("epochs = \n")
    message, loaded = tab.load_config(str(broken))
    assert loaded is None and message.text.startswith("Not loaded: config file broken.toml is not valid TOML")
    two_mistakes = tmp_path / "two.toml"
    two_mistakes.write_text("epochs = 0\nlerning_rate = 0.1\n")
    message, loaded = tab.load_config(str(two_mistakes))
    assert loaded is None and str(tmp_path) not in message.text
    assert message.text == ("Not loaded: two.toml has 2 problems: unknown setting 'lerning_rate' (did you mean "
                       "'learning_rate'?); epochs must be at least 1, got 0.")


def test_model_discovery(tmp_path):
    (tmp_path / "sd15.safetensors").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "old.ckpt").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "model_index.json").write_text("{}")
    (tmp_path / "folder" / "unet").mkdir()  # a diffusers folder's parts are not models of their own
    (tmp_path / "folder" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    models = discover_models(tmp_path)
    assert models[0] == "builtin:toy"
    assert models[-3:] == [str(tmp_path / "folder"), str(tmp_path / "sd15.safetensors"),
                           str(tmp_path / "sub" / "old.ckpt")]


def test_tab_builds_and_wires_its_events():
    pytest.importorskip("gradio")
    from prdp_ui import build_tab

    def name(fn):
        if fn.__name__ == "continuous_fn":  # Gradio 3 wraps a load(every=...) callback
            fn = inspect.getclosurevars(fn).nonlocals["fn"]
        return fn.__name__

    blocks = build_tab(HostContext())
    names = [getattr(fn, "name", "") or name(fn.fn) for fn in blocks.fns.values()] \
        if isinstance(blocks.fns, dict) else [name(fn.fn) for fn in blocks.fns]
    # start, stop, resume, export, save, load, quick try, the estimate on page load and on each input's change, the
    # run's form on page load, poll
    assert len(names) == 10 + len(blocks.prdp_inputs)
    assert {"stop", "resume", "load_config", "poll"} <= set(names)


def test_prdp_ui_serves_on_this_machine_only_by_default(monkeypatch, tmp_path):
    gradio = pytest.importorskip("gradio")
    from prdp_core.cli import main

    launched = {}
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    assert main(["ui", "--models", str(tmp_path), "--loras", str(tmp_path / "loras")]) == 0
    assert launched == {"server_name": "127.0.0.1", "server_port": 7860}


def test_the_engine_imports_no_host():
    import ast

    hosts = {"gradio", "comfy", "comfy_extras", "folder_paths", "nodes", "modules", "modules_forge", "launch"}
    engine = Path(__file__).parents[1] / "prdp_core"
    found = []
    for path in engine.rglob("*.py"):  # every import statement, a lazy one inside a function too
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            found += [f"{path.name}: {name}" for name in names if name.split(".")[0] in hosts]
    assert found == []


def test_prdp_ui_without_gradio_says_how_to_install(monkeypatch, capsys):
    import sys

    from prdp_core.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio now raises ImportError
    assert main(["ui"]) == 2
    assert "pip install 'prdp-lora[ui]'" in capsys.readouterr().err
