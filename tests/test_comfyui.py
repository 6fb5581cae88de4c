"""The ComfyUI node pack, imported as ComfyUI imports a custom node, against the test double of the ComfyUI surface it
uses (tests/comfyui_double): the nodes' declarations follow ComfyUI's rules, training through the node equals
`prdp train`, Interrupt + resume gives the same LoRA, errors are one sentence, scoring equals `prdp score`."""

import importlib.util
import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from prdp_core.cli import main
from prdp_core.config import TrainConfig
from prdp_core.errors import ConfigError, PrdpError

ROOT = Path(__file__).resolve().parents[1]
DOUBLE = Path(__file__).resolve().parent / "comfyui_double"
# what tiny_config (conftest.py) sets, as node inputs: the train node's widgets, then the advanced settings
TINY_BASIC = {"model": "builtin:tiny", "prompt_set": "builtin:animals", "eval_prompts": "", "epochs": 1,
              "prompts_per_epoch": 2, "images_per_prompt": 3, "num_steps": 4, "lora_rank": 4, "lora_alpha": 8.0}
TINY_ADVANCED = {"batch_size": 2, "updates_per_epoch": 2, "eval_images_per_prompt": 2, "eval_max_prompts": 2}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    """The pack loaded by the double's ComfyUI (base folder with models/ and output/), as `nodes`, and the double's
    modules as `folder_paths`, `utils`, `mm`; everything is unloaded afterwards."""
    base = tmp_path_factory.mktemp("ComfyUI")
    for folder in ("models/checkpoints", "models/loras", "output"):
        (base / folder).mkdir(parents=True)
    sys.path.insert(0, str(DOUBLE))
    name = str(ROOT).replace(".", "_x_")
    try:
        import comfy.model_management as mm
        import comfy.utils as utils
        import folder_paths

        folder_paths.set_base_path(str(base))
        # ComfyUI's load_custom_node: the folder's __init__.py under a module name made from its path
        spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
        pack = importlib.util.module_from_spec(spec)
        sys.modules[name] = pack
        spec.loader.exec_module(pack)
        yield type("Comfy", (), {"nodes": pack.NODE_CLASS_MAPPINGS, "names": pack.NODE_DISPLAY_NAME_MAPPINGS,
                                 "base": base, "folder_paths": folder_paths, "utils": utils, "mm": mm})
    finally:
        sys.path.remove(str(DOUBLE))
        for module in list(sys.modules):  # the double and the pack; the libraries they loaded stay, as in any process
            if module.split(".")[0] in ("folder_paths", "comfy", name):
                del sys.modules[module]


def run_node(cls, **inputs):
    """Execute a node as ComfyUI's executor does: widget defaults for what is not given, under inference mode.
    Returns the node's result tuple (and its "ui" dict, for output nodes that return one)."""
    values = {name: options["default"] for section in ("required", "optional")
              for name, (kind, options) in cls.INPUT_TYPES().get(section, {}).items() if "default" in options}
    values.update(inputs)
    with torch.inference_mode():
        out = getattr(cls(), cls.FUNCTION)(**values)
    return (out["result"], out.get("ui")) if isinstance(out, dict) else (out, None)


def mix_of(comfy, *rewards):
    mix = None
    for name, weight in rewards:
        (mix,), _ = run_node(comfy.nodes["PRDPReward"], reward=name, weight=weight, mix=mix)
    return mix


def train(comfy, lora_name="tiny", **inputs):
    (advanced,), _ = run_node(comfy.nodes["PRDPAdvancedSettings"], **TINY_ADVANCED)
    mix = mix_of(comfy, ("jpeg_compressibility", 1.0))
    return run_node(comfy.nodes["PRDPTrainLoRA"], reward_mix=mix, advanced=advanced, lora_name=lora_name,
                    **{**TINY_BASIC, **inputs})


def runs(comfy) -> list[Path]:
    return sorted(p for p in (comfy.base / "output" / "prdp").iterdir() if (p / "config.toml").is_file())


def interrupting_at(comfy, fraction):
    """A progress hook that presses Interrupt once the bar passes `fraction`, as a user would."""
    server_hook = comfy.utils.PROGRESS_BAR_HOOK

    def hook(value, total, preview, node_id=None):
        if value >= total * fraction:
            comfy.mm.interrupt_current_processing()
        server_hook(value, total, preview, node_id)
    return hook


# ---------------------------------------------------------------------------------------------- declarations
def test_every_node_follows_comfyui_rules(comfy):
    assert set(comfy.names) == set(comfy.nodes)
    for name, cls in comfy.nodes.items():
        assert cls.CATEGORY == "PRDP" and cls.DESCRIPTION and callable(getattr(cls, cls.FUNCTION))
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES)
        assert len(getattr(cls, "OUTPUT_IS_LIST", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        declared = cls.INPUT_TYPES()
        assert set(declared) <= {"required", "optional", "hidden"}
        for section in declared.values():
            for input_name, (kind, options) in section.items():
                where = f"{name}.{input_name}"
                assert options.get("tooltip"), where
                if isinstance(kind, list):
                    assert kind and options["default"] in kind, where
                elif kind in ("INT", "FLOAT"):
                    assert options["min"] <= options["default"] <= options["max"], where
                    assert isinstance(options["default"], int if kind == "INT" else float), where
                elif kind == "BOOLEAN":
                    assert isinstance(options["default"], bool), where
                elif kind == "STRING":
                    assert isinstance(options["default"], str), where
                else:
                    assert kind.isupper(), where  # a link type: IMAGE, PRDP_REWARD_MIX ...


def _another_value(spec):
    """A valid value of the setting other than its default."""
    if spec.kind == "checkbox":
        return not spec.default
    if spec.choices:
        return spec.choices[-1] if spec.choices[-1] != spec.default else spec.choices[0]
    if spec.name == "resolution":
        return 512  # a multiple of 8
    if spec.kind == "int":
        return spec.default + 1 if spec.maximum is None or spec.default < spec.maximum else spec.default - 1
    if spec.kind == "float":
        return spec.default / 2 if spec.default else 0.5
    if spec.kind == "list":
        return spec.default[:1]
    return "a blurry photo" if spec.name == "negative_prompt" else "other"


def test_training_inputs_are_the_config_fields(comfy):
    """Every TrainConfig field is a widget of the train node or of the advanced node, or decided by the node; a
    value set in either node is the value the run gets."""
    from prdp_core.config import field_specs, to_widget

    train_node = comfy.nodes["PRDPTrainLoRA"]
    train_inputs = train_node.INPUT_TYPES()["required"]
    advanced_inputs = comfy.nodes["PRDPAdvancedSettings"].INPUT_TYPES()["required"]
    fields = set(TrainConfig().to_dict())
    assert not set(advanced_inputs) & set(train_inputs)
    own = ("model", "prompts", "eval_prompts", "lora_name")  # inputs of their own form, tested on their own
    basic = [spec for spec in field_specs(tuple(fields & set(train_inputs))) if spec.name not in own]
    wanted = {spec.name: _another_value(spec) for spec in [*basic, *field_specs(tuple(advanced_inputs))]
              if spec.name != "vae"}  # a VAE is a file that must exist
    (advanced,), _ = run_node(comfy.nodes["PRDPAdvancedSettings"],
                              **{name: to_widget(name, value) for name, value in wanted.items()
                                 if name in advanced_inputs})
    config = train_node.config("builtin:toy", mix_of(comfy, ("toy_match", 1.0)), "", "builtin:toy_train", "",
                               False, advanced, {name: value for name, value in wanted.items() if name in train_inputs})
    assert {name: getattr(config, name) for name in wanted} == wanted
    # the rest the node decides: the mix from the reward nodes, the folder and device from ComfyUI's, a run's name
    assert fields - set(train_inputs) - set(advanced_inputs) == {"rewards", "reward_options", "output_dir", "device",
                                                                 "run_name"}
    for spec in field_specs(tuple(advanced_inputs)):  # generated from the field's metadata
        kind, options = advanced_inputs[spec.name]
        assert options["tooltip"] == spec.help
        if spec.positive:
            assert 0 < options["min"] <= options["default"]  # ComfyUI's bounds are inclusive
        elif spec.minimum is not None:
            assert options["min"] == spec.minimum
    assert train_inputs["seed"][1]["control_after_generate"] is False  # a training seed is not re-rolled per queue
    assert train_inputs["model"][0][0] == "builtin:toy"
    learning_rate = train_inputs["learning_rate"][1]
    assert learning_rate["step"] <= TrainConfig.learning_rate / 10  # ComfyUI rounds a float to its step


def test_low_vram_and_advanced_settings_merge(comfy, tmp_path):
    train_node = comfy.nodes["PRDPTrainLoRA"]
    (advanced,), _ = run_node(comfy.nodes["PRDPAdvancedSettings"], batch_size=4, lora_targets="to_q, to_v")
    assert advanced == {"batch_size": 4, "lora_targets": ["to_q", "to_v"]}  # only what differs from the defaults
    config = train_node.config("builtin:toy", mix_of(comfy, ("toy_match", 1.0)), "a red cat\n\n a blue dog ",
                               "builtin:toy_train", "builtin:toy_unseen", True, advanced, {"epochs": 3})
    assert (config.precision, config.gradient_checkpointing, config.batch_size) == ("fp16", True, 4)
    assert config.epochs == 3 and config.device == "cpu" and config.eval_prompts == "builtin:toy_unseen"
    assert Path(config.prompts).read_text() == "a red cat\na blue dog\n"
    assert Path(config.output_dir) == comfy.base / "output" / "prdp"


# ---------------------------------------------------------------------------------------------- training
def test_training_through_the_node_equals_prdp_train(comfy, tmp_path, monkeypatch, caplog):
    import logging
    import weakref

    import prdp_core.trainer

    pipelines = []

    def load_pipeline(*args, **kwargs):
        pipe = load(*args, **kwargs)
        pipelines.append(weakref.ref(pipe))
        return pipe
    load = prdp_core.trainer.load_pipeline
    monkeypatch.setattr(prdp_core.trainer, "load_pipeline", load_pipeline)
    comfy.mm.calls.clear()
    comfy.utils.updates.clear()
    caplog.set_level(logging.INFO, logger="prdp")
    (lora, lora_name, before_after, curve), ui = train(comfy, lora_name="tiny.safetensors")
    console = [record.getMessage() for record in caplog.records if record.name == "prdp"]
    assert sum("epoch 1/1: reward" in line for line in console) == 1  # the console gets each log line once
    assert console[-1].startswith("[PRDP] LoRA saved as") and "as tiny.safetensors after a refresh" in console[-1]
    assert lora_name == "tiny.safetensors"
    path = comfy.base / "models" / "loras" / lora_name
    assert {p.name for p in path.parent.iterdir()} == {"tiny.safetensors", "tiny.json", "tiny.preview.png"}
    # ComfyUI's models go before training; the run's own pipeline is gone when the node returns
    assert comfy.mm.calls[0] == "unload_all_models" and comfy.mm.calls[-1] == "soft_empty_cache"
    assert len(pipelines) == 1 and pipelines[0]() is None

    # the LORA_MODEL output is the file's kohya state dict, which ComfyUI's Load LoRA Model applies
    on_disk = load_file(path)
    assert set(lora) == set(on_disk) and all(torch.equal(lora[k], on_disk[k]) for k in lora)
    assert all(k.startswith("lora_unet_") for k in lora)

    # `prdp train` with the config the node ran gives the same LoRA
    (run_dir,) = runs(comfy)
    config = TrainConfig.load(run_dir / "config.toml")
    config.output_dir, config.run_name = str(tmp_path / "cli"), "cli"
    config.save(tmp_path / "node.toml")
    assert main(["train", "--config", str(tmp_path / "node.toml"), "--quiet"]) == 0
    cli = load_file(tmp_path / "cli" / "cli" / f"{config.lora_name or 'prdp_cli'}.safetensors")
    assert set(cli) == set(on_disk) and all(torch.equal(cli[k], on_disk[k]) for k in cli)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["ss_output_name"] == "tiny"

    for image in (before_after, curve):  # IMAGE batches of one, read from the run folder's pictures
        assert image.shape[0] == 1 and image.shape[3] == 3 and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1 and image.std() > 0
    shown = ui["images"][0]
    assert (comfy.base / "output" / shown["subfolder"] / shown["filename"]).is_file() and shown["type"] == "output"

    values = [value for value, total, _ in comfy.utils.updates]
    assert values == sorted(values) and values[-1] == comfy.utils.updates[-1][1]  # never backwards, ends full
    previews = [preview for *_, preview in comfy.utils.updates if preview is not None]
    assert previews and previews[0][0] == "JPEG" and isinstance(previews[0][1], Image.Image)


def test_interrupt_then_resume_gives_the_same_lora(comfy):
    count = len(runs(comfy))

    server_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.PROGRESS_BAR_HOOK = interrupting_at(comfy, 2.3 / 4)  # stages: before-eval, epoch 1, 2, after-eval
    try:
        with pytest.raises(comfy.mm.InterruptProcessingException):
            train(comfy, lora_name="parts", epochs=2, seed=7)
    finally:
        comfy.utils.PROGRESS_BAR_HOOK = server_hook
    assert not comfy.mm.processing_interrupted()  # the flag is consumed, the next prompt runs
    interrupted = runs(comfy)[-1]
    assert len(runs(comfy)) == count + 1 and not (interrupted / "summary.json").exists()
    assert sorted(p.name for p in (interrupted / "checkpoints").iterdir()) == ["epoch-0000", "epoch-0001"]
    assert not (comfy.base / "models" / "loras" / "parts.safetensors").exists()

    (resumed, *_), _ = train(comfy, lora_name="parts", epochs=2, seed=7)  # queued again, resume on
    assert len(runs(comfy)) == count + 1 and (interrupted / "summary.json").is_file()
    (whole, *_), _ = train(comfy, lora_name="whole", resume=False, epochs=2, seed=7)  # a new, uninterrupted run
    assert len(runs(comfy)) == count + 2
    assert set(resumed) == set(whole) and all(torch.equal(resumed[k], whole[k]) for k in resumed)

    comfy.mm.calls.clear()
    (again, *_), _ = train(comfy, lora_name="parts_again", epochs=2, seed=7)  # finished: reused, not retrained
    assert "unload_all_models" not in comfy.mm.calls and len(runs(comfy)) == count + 2
    assert all(torch.equal(again[k], resumed[k]) for k in again)
    train(comfy, lora_name="fewer", epochs=1, seed=7)  # fewer epochs than the finished run: trained anew
    assert len(runs(comfy)) == count + 3


def test_a_run_that_trained_nothing_is_neither_exported_nor_preferred(comfy, monkeypatch):
    train(comfy, lora_name="first", epochs=1, seed=11)
    finished = runs(comfy)[-1]
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", interrupting_at(comfy, 0.0))
    with pytest.raises(comfy.mm.InterruptProcessingException):
        train(comfy, lora_name="aborted", epochs=1, seed=11, resume=False)  # stopped before its first epoch
    monkeypatch.undo()
    aborted = max(runs(comfy), key=lambda p: p.stat().st_mtime_ns)
    assert aborted != finished and not (aborted / "checkpoints" / "epoch-0001").exists()

    export = comfy.nodes["PRDPExportLoRA"]
    assert aborted.name not in export.INPUT_TYPES()["required"]["run"][0]
    _, ui = run_node(export, run="latest", lora_name="latest")
    assert aborted.name not in ui["text"][0] and "(1 of 1 epochs)" in ui["text"][0]
    with pytest.raises(ConfigError, match="no trained epoch"):
        run_node(export, run=aborted.name, lora_name="nothing")

    comfy.mm.calls.clear()
    train(comfy, lora_name="again", epochs=1, seed=11)  # resume on: the finished run, not the newer empty one
    assert "unload_all_models" not in comfy.mm.calls


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", ["../escape", "sub/dir", "/abs/path", "..", "a\\b", ""])
def test_lora_names_that_leave_the_folder_are_refused(comfy, name):
    for node, inputs in (("PRDPTrainLoRA", {}), ("PRDPExportLoRA", {})):
        with pytest.raises(ConfigError, match="plain file name|is empty; give it a name") as raised:
            if node == "PRDPTrainLoRA":
                train(comfy, lora_name=name)
            else:
                run_node(comfy.nodes[node], lora_name=name)
        assert _one_sentence(str(raised.value))


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and "Traceback" not in message


def test_engine_errors_are_one_sentence_and_the_next_run_works(comfy, tmp_path):
    with socket.socket() as s:  # a port nothing listens on: a reward server that is down
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    bad_scorer = tmp_path / "scorer.py"
    bad_scorer.write_text("def nan(images, prompts):\n    return [float('nan')] * len(images)\n")
    reward = comfy.nodes["PRDPReward"]
    cases = [
        (lambda: run_node(reward, reward="jpeg_compressibility", options="{not json"), "must be JSON"),
        (lambda: run_node(reward, reward="http", options='{"adress": "x"}'), "no option 'adress'"),
        (lambda: run_node(reward, custom="no_such_module:score"), "cannot be imported"),
        (lambda: run_node(reward, reward="toy_match", mix=mix_of(comfy, ("toy_match", 1.0))), "twice"),
        (lambda: train(comfy, model="missing.safetensors"), "not in ComfyUI's checkpoints folder"),
        (lambda: train(comfy, eval_prompts="builtin:nope"), "unknown builtin prompt set"),
        (lambda: train(comfy, epochs=0), "epochs must be at least 1"),
        (lambda: run_node(comfy.nodes["PRDPTrainLoRA"], reward_mix=mix_of(comfy, (f"{bad_scorer}:nan", 1.0)),
                          **TINY_BASIC), "non-finite"),  # fails inside the run, in its thread
        (lambda: run_node(comfy.nodes["PRDPTrainLoRA"], reward_mix=run_node(
            reward, reward="http", options=json.dumps({"url": f"http://127.0.0.1:{closed_port}", "retries": 0}))[0][0],
            **TINY_BASIC), "cannot reach reward server"),
    ]
    for call, expected in cases:
        with pytest.raises(PrdpError) as raised:
            call()
        assert expected in str(raised.value) and _one_sentence(str(raised.value)), str(raised.value)
    (lora, *_), _ = train(comfy, lora_name="after_errors", seed=3)  # the process is not left busy
    assert lora


# ---------------------------------------------------------------------------------------------- scoring, export
def test_scores_equal_prdp_score(comfy, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # noise compresses badly, a flat colour well: distinct scores
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) if i else np.full((32, 32, 3), 90, np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    # an IMAGE batch as ComfyUI's LoadImage makes it: float32 [B, H, W, 3] = pixels / 255
    batch = torch.stack([torch.from_numpy(np.asarray(Image.open(folder / f"{i}.png"), np.float32) / 255.0)
                         for i in range(3)])
    mix = mix_of(comfy, ("jpeg_compressibility", 2.0), ("jpeg_incompressibility", 0.5))
    (scores, table), ui = run_node(comfy.nodes["PRDPScoreImages"], images=batch, reward_mix=mix, prompts="a square")

    assert main(["score", "--reward", "jpeg_compressibility=2", "--reward", "jpeg_incompressibility=0.5",
                 "--images", str(folder), "--prompt", "a square", "--format", "json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    assert scores == [row["total"] for row in expected["images"]]
    lines = table.splitlines()
    assert lines[0].split() == ["image", "total", "jpeg_compressibility", "jpeg_incompressibility"]
    assert lines[-1].split()[:2] == ["mean", f"{expected['mean']['total']:.6g}"] and ui["text"] == [table]
    with pytest.raises(ConfigError, match="2 prompt lines for 3 images"):
        run_node(comfy.nodes["PRDPScoreImages"], images=batch, reward_mix=mix, prompts="one\ntwo")


def test_export_node_writes_the_chosen_format_into_loras(comfy):
    export = comfy.nodes["PRDPExportLoRA"]
    latest = runs(comfy)[-1].name
    assert latest in export.INPUT_TYPES()["required"]["run"][0]  # listed for the combo
    (name,), ui = run_node(export, run=latest, lora_name="exported", format="diffusers", dtype="bf16")
    path = comfy.base / "models" / "loras" / name
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("unet.") for k in f.keys()) and f.get_tensor(next(iter(f.keys()))).dtype == \
            torch.bfloat16
    assert (path.with_suffix(".json")).is_file() and latest in ui["text"][0]
    with pytest.raises(ConfigError, match="refresh the page"):
        run_node(export, run="gone", lora_name="x")


def test_the_example_workflow_fits_the_nodes(comfy):
    """Every widget value of the shipped workflow is valid for the node's current inputs, in their order."""
    workflow = json.loads((ROOT / "example_workflows" / "prdp_toy_train.json").read_text())
    ours = [node for node in workflow["nodes"] if node["type"] in comfy.nodes]
    assert {node["type"] for node in ours} == {"PRDPReward", "PRDPTrainLoRA"}
    for node in ours:
        declared = comfy.nodes[node["type"]].INPUT_TYPES()
        widgets = [(name, kind, options) for section in ("required", "optional")
                   for name, (kind, options) in declared.get(section, {}).items()
                   if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN")]
        assert len(widgets) == len(node["widgets_values"]), node["type"]
        for (name, kind, options), value in zip(widgets, node["widgets_values"]):
            if isinstance(kind, list):
                assert value in kind, name
            elif kind in ("INT", "FLOAT"):
                assert options["min"] <= value <= options["max"], name
        links = [slot["name"] for slot in node["inputs"] if slot.get("link") is not None]
        assert all(name in declared["required"] or name in declared.get("optional", {}) for name in links)
