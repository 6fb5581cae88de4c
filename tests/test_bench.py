"""The benchmarks run end to end at toy size (CI); their numbers are measured on real machines, not here."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_epoch_benchmark_reports_every_phase_for_an_sdxl_shaped_model(capsys):
    _load("bench_epoch").main(["--model", "builtin:tiny-xl", "--prompts", "builtin:animals", "--reward",
                               "jpeg_compressibility", "--epochs", "2", "--num-steps", "2", "--prompts-per-epoch",
                               "1", "--images-per-prompt", "2", "--updates-per-epoch", "1"])
    result = json.loads(capsys.readouterr().out)
    phases = result["median_epoch_s"]
    assert set(phases) == {"sampling", "decode", "reward", "reference", "optimization", "total", "unet"}
    assert 0 < phases["unet"] < phases["total"] and 0 < result["unet_share"] < 1
    assert result["epochs_measured"] == 1 and result["resolution"] == 64 and result["lora_modules"] > 0
    assert result["peak_memory_gib"] == {} and result["peak_memory_gib_max"] is None  # CPU: no accelerator memory


def test_precision_benchmark_compares_gradients_with_fp32(capsys):
    _load("precision_gradient").main(["--device", "cpu", "--images", "2", "--steps", "2"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["vs_fp32"]) == {"fp32-repeat", "fp16", "fp16-unscaled", "bf16"}
    assert result["vs_fp32"]["fp32-repeat"]["relative_error"] < 1e-6  # CPU kernels are deterministic
    assert result["vs_fp32"]["fp16"]["cosine"] > 0.9
