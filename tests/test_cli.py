"""The `prdp` command: config handling, the four commands, and bad input (one-line errors, nothing lost)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from conftest import DIFFUSERS_LOADS_LORAS
from prdp_core import TrainConfig
from prdp_core.errors import ConfigError
from prdp_core.cli import build_parser, main, parse_reward_flags, resolve_train_config
from prdp_core.prompts import load_prompts

TINY = ["--epochs", "1", "--num-steps", "2", "--prompts-per-epoch", "1", "--images-per-prompt", "2",
        "--updates-per-epoch", "1", "--eval-images-per-prompt", "1", "--eval-max-prompts", "1", "--quiet"]


def _error_line(capsys):
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert "Traceback" not in captured.err + captured.out
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def out_dir(tmp_path):
    out = tmp_path / "runs"
    (out / "earlier-run").mkdir(parents=True)
    (out / "earlier-run" / "my.safetensors").write_bytes(b"a LoRA someone trained")
    return out


@pytest.mark.parametrize("case", ["empty_prompts", "unknown_reward", "missing_model", "bad_config_key", "bad_weight"])
def test_bad_input_is_one_line_error_and_loses_nothing(case, tmp_path, out_dir, capsys):
    before = _snapshot(out_dir)
    args = ["train", "--out", str(out_dir), *TINY]
    if case == "empty_prompts":
        (tmp_path / "prompts.txt").write_text("# only a comment\n\n")
        args += ["--prompts", str(tmp_path / "prompts.txt")]
        expected = "holds no prompts"
    elif case == "unknown_reward":
        args += ["--reward", "aesthetics_v9"]
        expected = "unknown reward 'aesthetics_v9'"
    elif case == "missing_model":
        args += ["--model", str(tmp_path / "models" / "sd15.safetensors"), "--prompts", "builtin:animals"]
        expected = "does not exist"
    elif case == "bad_config_key":
        (tmp_path / "run.toml").write_text("learning_rte = 0.1\n")
        args += ["--config", str(tmp_path / "run.toml")]
        expected = "did you mean 'learning_rate'"
    else:
        args += ["--reward", "jpeg_compressibility=lots"]
        expected = "must be a number"
    assert main(args) == 2
    assert expected in _error_line(capsys)
    assert _snapshot(out_dir) == before


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("keep me")
    assert main(["train", "--out", str(blocker / "runs"), *TINY]) == 2
    assert "not writable" in _error_line(capsys) and blocker.read_text() == "keep me"


def test_console_script_exit_code_without_traceback(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = subprocess.run([sys.executable, "-m", "prdp_core.cli", "train", "--prompts", str(empty)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().startswith("error: ")


def test_flags_override_config_file_and_round_trip(tmp_path):
    config = TrainConfig(epochs=3, beta=0.5, rewards={"jpeg_incompressibility": 2.0}, lora_targets=["to_q", "to_v"])
    config.save(tmp_path / "run.toml")
    config.save(tmp_path / "run.json")
    assert TrainConfig.load(tmp_path / "run.toml") == config == TrainConfig.load(tmp_path / "run.json")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.toml"), "--epochs", "7",
                                      "--lora-targets", "to_k,to_out.0", "--reward", "mod.sub:fn=0.5"])
    resolved = resolve_train_config(args)
    assert (resolved.epochs, resolved.beta) == (7, 0.5)
    assert resolved.lora_targets == ["to_k", "to_out.0"]
    assert resolved.rewards == {"mod.sub:fn": 0.5}
    assert parse_reward_flags(["a", "C:\\scorers\\x.py:f=2"]) == {"a": 1.0, "C:\\scorers\\x.py:f": 2.0}


def test_train_export_sample_score_end_to_end(tmp_path, capsys):
    out = tmp_path / "runs"
    assert main(["train", "--out", str(out), "--run-name", "demo", *TINY]) == 0
    printed = capsys.readouterr().out
    run = out / "demo"
    lora = run / "prdp_demo.safetensors"
    assert f"LoRA: {lora}" in printed
    for name in ("config.toml", "metrics.jsonl", "summary.json", "reward_curve.png", "previews/before_after.png",
                 "previews/epoch-0001.png", "checkpoints/epoch-0001/adapter.safetensors", "prdp_demo.json",
                 "prdp_demo.preview.png"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["eval"]["seen"]) == {"before", "after", "delta"} and summary["wall_time_s"] > 0

    exported = tmp_path / "demo_fp32.safetensors"
    assert main(["export", str(run), "--out", str(exported), "--format", "diffusers", "--dtype", "fp32"]) == 0
    with safe_open(str(exported), framework="pt") as f:
        assert all(k.startswith("unet.") and ".lora_" in k for k in f.keys())
    card = tmp_path / "card.safetensors"
    assert main(["export", str(run), "--out", str(card), "--name", "My card", "--a1111-sidecar", "--preview",
                 str(run / "reward_curve.png")]) == 0
    with safe_open(str(card), framework="pt") as f:
        assert f.metadata()["ss_output_name"] == "My card"
    assert json.loads((tmp_path / "card.json").read_text())["sd version"] == "SD1"
    assert (tmp_path / "card.preview.png").is_file()
    assert main(["export", str(run), "--out", str(card), "--preview", str(run / "config.toml")]) == 2

    samples = tmp_path / "samples"
    sample = ["sample", "--lora", str(lora), "--lora-scale", "8", "--prompt", "a fox", "--seeds", "0,1", "--steps", "2",
              "--out", str(samples)]
    if DIFFUSERS_LOADS_LORAS:
        assert main(sample) == 0
        assert sorted(p.name for p in (samples / "lora").iterdir()) == ["p000_s0.png", "p000_s1.png"]
        assert (samples / "comparison.png").is_file()
    else:  # A1111 1.10's transformers: diffusers cannot load a LoRA there, which the CLI says in one sentence
        assert main(sample) == 2 and "needs transformers 4.34 or later" in capsys.readouterr().err
        assert main(sample[:1] + sample[5:]) == 0
    capsys.readouterr()

    assert main(["score", "--reward", "jpeg_compressibility", "--images", str(samples / "base"), "--prompt", "a fox"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "image,total,jpeg_compressibility" and len(rows) == 4 and rows[-1].startswith("mean,")
    values = [float(r.split(",")[1]) for r in rows[1:3]]
    assert float(rows[-1].split(",")[1]) == pytest.approx(sum(values) / 2, rel=1e-5)


def test_resume_refuses_changed_settings(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--beta", "2"]) == 2
    line = _error_line(capsys)
    assert "only epochs, batch_size" in line and "not beta" in line


def test_reward_option_flags_merge_into_the_config_file_and_are_validated(tmp_path, capsys):
    from prdp_core.cli import parse_reward_option_flags

    assert parse_reward_option_flags(["http.url=http://h:1/a=b", "http.timeout=2.5", "hps.fp16=true",
                                      "my.mod:fn.tags=[1, \"x\"]"]) == {
        "http": {"url": "http://h:1/a=b", "timeout": 2.5}, "hps": {"fp16": True}, "my.mod:fn": {"tags": [1, "x"]}}
    for bad in ("http=1", "url=http://h", ".url=x", "http.url"):
        with pytest.raises(ConfigError, match="must look like NAME.KEY=VALUE"):
            parse_reward_option_flags([bad])

    TrainConfig(rewards={"http": 1.0, "jpeg_compressibility": 1.0}, reward_options={
        "http": {"url": "http://a:1", "retries": 1}}).save(tmp_path / "run.toml")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.toml"), "--reward-option",
                                      "http.url=http://b:2", "--reward-dtype", "bf16",
                                      "--reward-normalization", "batch_zscore"])
    resolved = resolve_train_config(args)
    assert resolved.reward_options == {"http": {"url": "http://b:2", "retries": 1}}  # merged key by key
    assert (resolved.reward_dtype, resolved.reward_normalization) == ("bf16", "batch_zscore")
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "run.toml"), "--reward",
                                      "jpeg_compressibility"])
    assert resolve_train_config(args).reward_options == {}  # a new mix drops the options of rewards it left out

    with pytest.raises(ConfigError, match="reward_options names 'http', which is not in the reward mix"):
        TrainConfig(reward_options={"http": {"url": "x"}}).validate()
    with pytest.raises(ConfigError, match="reward_options.http must map option names to strings"):
        TrainConfig(rewards={"http": 1.0}, reward_options={"http": {"url": None}}).validate()
    assert main(["train", "--reward", "http", "--reward-option", "http.timeout=5", *TINY]) == 2
    assert "needs its server's address as option url" in _error_line(capsys)


def test_score_reads_prompts_file_and_reward_options_and_prints_components(tmp_path, capsys):
    import threading

    from PIL import Image

    from prdp_core.reward_server import RewardServer
    from prdp_core.rewards import Reward
    from prdp_core.rewards.jpeg import jpeg_size_kb

    class PromptLength(Reward):
        name = "prompt_length"

        def score_batch(self, images, prompts):
            return [len(p) for p in prompts]

    server = RewardServer(PromptLength(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    images = tmp_path / "images"
    images.mkdir()
    colours = {"b.png": (0, 0, 0), "a.png": (255, 0, 0)}
    for name, colour in colours.items():
        Image.new("RGB", (16, 16), colour).save(images / name)
    (tmp_path / "prompts.txt").write_text("# sorted order: a.png, b.png\na red square\nblack\n")
    try:
        assert main(["score", "--images", str(images), "--prompts", str(tmp_path / "prompts.txt"), "--reward",
                     "jpeg_compressibility=2", "--reward", "http=0.5", "--reward-option",
                     f"http.url=http://127.0.0.1:{server.server_address[1]}", "--format", "json"]) == 0
    finally:
        server.shutdown()
        server.server_close()
    out = json.loads(capsys.readouterr().out)
    assert out["reward"] == "2*jpeg_compressibility + 0.5*http"
    rows = out["images"]
    assert [Path(r["image"]).name for r in rows] == ["a.png", "b.png"]
    assert [r["http"] for r in rows] == [len("a red square"), len("black")]
    for row in rows:
        size = jpeg_size_kb(Image.open(row["image"]))
        assert row["jpeg_compressibility"] == pytest.approx(-size, rel=1e-6)
        assert row["total"] == pytest.approx(2 * row["jpeg_compressibility"] + 0.5 * row["http"], rel=1e-6)
    assert out["mean"]["http"] == pytest.approx(8.5) and set(out["mean"]) == {"total", "jpeg_compressibility", "http"}

    (tmp_path / "one.txt").write_text("only one\n")
    assert main(["score", "--images", str(images), "--prompts", str(tmp_path / "one.txt"), "--reward",
                 "jpeg_compressibility"]) == 2
    assert "has 1 prompts for 2 images" in _error_line(capsys)


def test_reward_server_command_warns_when_reachable_from_other_machines(monkeypatch, capsys):
    from prdp_core.reward_server import RewardServer

    served = []
    monkeypatch.setattr(RewardServer, "serve_forever", lambda self: served.append(self.reward))
    assert main(["reward-server", "--reward", "jpeg_compressibility", "--host", "0.0.0.0", "--port", "0",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert served[0].name == "jpeg_compressibility"
    assert captured.err.startswith("warning: listening on 0.0.0.0: anyone who can reach port")
    assert "serving reward 'jpeg_compressibility' at http://0.0.0.0:" in captured.out
    assert main(["reward-server", "--reward", "jpeg_compressibility", "--port", "0"]) == 0
    assert "warning" not in capsys.readouterr().err  # 127.0.0.1 by default
    assert main(["reward-server", "--reward", "jpeg_compressibility", "--reward-option", "quality=90"]) == 2
    assert "has no option 'quality'" in _error_line(capsys)


def test_the_toy_defaults_do_not_leak_into_real_runs(tmp_path, capsys):
    from prdp_core.trainer import Trainer

    # the SD1.5 example evaluates its own prompts, not the toy world's captions, and says so in one line
    example = TrainConfig.load(Path(__file__).parents[1] / "examples" / "sd15_jpeg.toml")
    trainer = Trainer(TrainConfig.from_dict({**example.to_dict(), "device": "cpu", "output_dir": str(tmp_path)}))
    assert list(trainer.eval_sets) == ["seen"] and "a small red circle" not in " ".join(trainer.eval_sets["seen"])
    # the toy's own captions with a real model: refused before anything loads, with what to give instead
    checkpoint = tmp_path / "sd15.safetensors"
    checkpoint.write_bytes(b"")
    assert main(["train", "--model", str(checkpoint), "--out", str(tmp_path / "runs")]) == 2
    assert "only fit builtin:toy; for" in _error_line(capsys) and not (tmp_path / "runs").exists()
    assert Trainer(TrainConfig(device="cpu")).eval_sets["unseen"][0] == load_prompts("builtin:toy_unseen")[0]


def test_an_error_in_the_users_reward_code_keeps_its_traceback(tmp_path, capsys):
    scorer = tmp_path / "my_scorer.py"
    scorer.write_text("def score(images, prompts):\n    return helper(images)\n\n\n"
                      "def helper(images):\n    raise KeyError('brightness')\n")
    args = ["train", "--reward", f"{scorer}:score", "--out", str(tmp_path / "runs"), "--run-name", "mine", *TINY]
    assert main(args) == 2
    line = _error_line(capsys)  # one line, which says where the whole story is
    assert "KeyError" in line and "brightness" in line and "error.log" in line
    logged = (tmp_path / "runs" / "mine" / "error.log").read_text()
    assert 'my_scorer.py", line 6, in helper' in logged  # down to the user's own line
    assert main(["--debug", *args[:-len(TINY)], "--run-name", "again", *TINY]) == 2
    assert 'my_scorer.py", line 6, in helper' in capsys.readouterr().err  # --debug shows it as well


def test_help_imports_neither_torch_nor_diffusers():
    # `prdp --help` answers at once (0.07 s here, 2.6 s when the package imported torch eagerly)
    code = ("import sys\nfrom prdp_core.cli import main\n"
            "for argv in (['--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--reward NAME[=WEIGHT]" in done.stdout and done.stderr.strip() == "[]"
