"""The benchmarks run end to end at toy size (CI); their numbers are measured on real machines, not here."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

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
    outside = result["outside_unet_s"]
    assert set(outside) == {"sampling", "decode", "reward", "reference", "optimization"}
    assert all(v >= 0 for v in outside.values()) and outside["decode"] == phases["decode"]
    assert result["epochs_measured"] == 1 and result["resolution"] == 64 and result["lora_modules"] > 0
    assert result["peak_memory_gib"] == {} and result["peak_memory_gib_max"] is None  # CPU: no accelerator memory


def test_precision_benchmark_compares_gradients_with_fp32(capsys):
    _load("precision_gradient").main(["--device", "cpu", "--images", "2", "--steps", "2"])
    result = json.loads(capsys.readouterr().out)
    assert set(result["vs_fp32"]) == {"fp32-repeat", "fp16", "fp16-unscaled", "bf16"}
    assert result["vs_fp32"]["fp32-repeat"]["relative_error"] < 1e-6  # CPU kernels are deterministic
    assert result["vs_fp32"]["fp16"]["cosine"] > 0.9


def test_gradient_noise_estimates_recover_a_known_signal_and_noise():
    bench = _load("gradient_noise")
    generator = torch.Generator().manual_seed(0)
    signal = torch.full((1000,), 0.1)  # |G|^2 = 10
    grads = [signal + torch.randn(1000, generator=generator) for _ in range(400)]  # tr(Sigma) = 1000
    estimated_signal, trace = bench.signal_and_trace(grads)
    assert abs(estimated_signal - 10) < 1 and abs(trace - 1000) < 30
    assert abs(bench.noise_scale(estimated_signal, trace, batch=16) - 1600) < 200
    assert bench.noise_scale(-0.5, trace, batch=16) is None


def test_gradient_noise_benchmark_runs_on_a_tiny_model(capsys):
    _load("gradient_noise").main(["--num-prompts", "2", "--repeats", "2", "--model", "builtin:tiny", "--prompts",
                                  "builtin:animals", "--reward", "jpeg_compressibility", "--eval-prompts", "",
                                  "--num-steps", "2", "--images-per-prompt", "2", "--train-step-fraction", "1"])
    result = json.loads(capsys.readouterr().out)
    assert len(result["per_prompt"]) == 2 and result["repeats"] == 2 and result["lora_parameters"] > 0
    for prompt in result["per_prompt"].values():
        assert -1 <= prompt["mean_cosine"] <= 1


def test_reevaluation_on_the_runs_own_seed_reproduces_its_summary(tiny_config, capsys):
    from prdp_core import Trainer

    trainer = Trainer(tiny_config)
    trainer.run()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())["eval"]["seen"]
    capsys.readouterr()
    _load("reevaluate").main([str(trainer.run_dir), "--eval-seeds", str(tiny_config.seed), "7"])
    result = json.loads(capsys.readouterr().out)["by_eval_seed"]
    own, other = result[str(tiny_config.seed)]["seen"], result["7"]["seen"]
    assert own["before"] == pytest.approx(summary["before"]["mean"], abs=1e-6)
    assert own["change"] == pytest.approx(summary["delta"]["mean"], abs=1e-6)
    assert own["se"] == pytest.approx(summary["delta"]["se"], rel=1e-4)
    assert other["before"] != pytest.approx(own["before"], abs=1e-6)  # other seeds, other images


def test_noise_window_benchmark_varies_only_the_named_noise(capsys):
    bench = _load("toy_noise_windows")
    assert bench.parse_window("x_T") == {-1} and bench.parse_window("3-5") == {3, 4, 5} and bench.parse_window("2") == {2}
    bench.main(["--windows", "5-6", "x_T", "--captions", "2", "--contexts", "2", "--draws", "3", "--steps", "3"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["window"] for r in rows] == ["5-6", "x_T"]
    assert rows[0]["within_share"] in (0.0, None)  # no step 5 or 6 at 3 steps: the draws of a context are one image


def test_prdp_vs_ddpo_table_pools_seeds_with_independent_standard_errors():
    def result(objective, seed, delta_mean, delta_se):
        stat = {"mean": 0.5, "se": 0.02}
        split = {"before": stat, "after": stat, "delta": {"mean": delta_mean, "se": delta_se}}
        return {"objective": objective, "seed": seed, "eval": {"seen": split, "unseen": split}, "reward": "toy_match"}

    results = [result("prdp", 0, 0.03, 0.03), result("prdp", 1, 0.01, 0.04),
               result("ddpo", 0, -0.02, 0.01), result("ddpo", 1, 0.0, 0.01)]
    pooled_rows = _load("toy_prdp_vs_ddpo").table(results).splitlines()[2:4]
    # mean of the seeds; SE = sqrt(0.03² + 0.04²) / 2 = 0.025 and sqrt(2 x 0.01²) / 2 = 0.00707
    assert pooled_rows[0].endswith("| +0.020 ± 0.025 | -0.010 ± 0.007 |")
    assert pooled_rows[1].startswith("| unseen | 0.500 ± 0.014 |")


def test_live_tensor_bytes_counts_each_storage_until_it_is_freed():
    meter = _load("memory_estimate").LiveTensorBytes()
    mib = 2**20
    with meter:
        a = torch.empty(mib, dtype=torch.uint8)
        b = torch.empty(2 * mib, dtype=torch.uint8)
        views = (b[:10], b.view(2, mib))  # share b's storage
        del a
        c = torch.empty(3 * mib, dtype=torch.uint8)
    assert (meter.current, meter.peak) == (5 * mib, 5 * mib)
    del b, views, c
    assert meter.current == 0


def test_memory_estimate_follows_the_memory_options():
    estimate = _load("memory_estimate").estimate
    from prdp_core import TrainConfig

    def peaks(**options):
        result = estimate(TrainConfig(model="builtin:tiny-xl", num_steps=2, **{"batch_size": 4, **options}))
        return result["peak_bytes"], result["resident_bytes"]

    plain, resident = peaks()
    assert resident["weights"] < plain["sampling"] < plain["optimization"]
    assert peaks(gradient_checkpointing=True)[0]["optimization"] < 0.7 * plain["optimization"]
    assert peaks(batch_size=1)[0]["optimization"] < 0.7 * plain["optimization"]
    half, half_resident = peaks(precision="fp16")
    assert half_resident["weights"] < 0.7 * resident["weights"] and half["optimization"] < plain["optimization"]
    assert peaks(offload_models=True)[1]["weights"] < resident["weights"]  # the text encoders wait on the CPU
