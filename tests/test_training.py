"""Whole runs: events, run folder, cancellation, resume determinism, and the reward going up."""

import json
import threading

import pytest
import torch

from prdp_core import TrainConfig, Trainer
from prdp_core.checkpoints import latest_checkpoint
from prdp_core.lora_weights import LoraWeights


def _final_weights(run_dir):
    return LoraWeights.load(latest_checkpoint(run_dir) / "adapter.safetensors").state_dict


def _metrics(run_dir, evals=False):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in rows if ("eval" in m) == evals]


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_config):
    config = TrainConfig.from_dict({**tiny_config.to_dict(), "epochs": 3, "run_name": "straight"})
    straight = Trainer(config)
    straight.run()

    stop, events = threading.Event(), []

    def stop_after_first_epoch(event):
        events.append(event)
        if event.kind == "CheckpointWritten" and event.epoch == 1:
            stop.set()
    stopped = Trainer(TrainConfig.from_dict({**config.to_dict(), "run_name": "stopped"}), stop_after_first_epoch)
    lora = stopped.run(stop)
    assert events[-1].kind == "Finished" and events[-1].cancelled and lora.is_file()
    assert latest_checkpoint(stopped.run_dir).name == "epoch-0001"

    resumed_events = []
    Trainer.resume(stopped.run_dir, resumed_events.append).run()
    assert resumed_events[0].kind == "RunStarted" and resumed_events[0].start_epoch == 1
    a, b = _final_weights(straight.run_dir), _final_weights(stopped.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained
    assert [m["reward_mean"] for m in _metrics(straight.run_dir)] == [m["reward_mean"] for m in _metrics(stopped.run_dir)]


def test_events_and_metrics(tiny_config):
    events = []
    trainer = Trainer(TrainConfig.from_dict({**tiny_config.to_dict(), "epochs": 2, "eval_every": 1,
                                             "eval_prompts": "builtin:animals"}), events.append)
    trainer.run()
    kinds = [e.kind for e in events if e.kind != "Progress"]
    assert kinds[0] == "RunStarted" and kinds[-1] == "Finished"
    assert kinds.count("EpochSampled") == 2 and kinds.count("StepMetrics") == 4 and kinds.count("EpochEnd") == 2
    assert {e.label for e in events if e.kind == "Evaluated"} == {"before", "epoch-1", "after"}
    sampled = next(e for e in events if e.kind == "EpochSampled")
    assert len(sampled.images) == len(sampled.rewards) == 6 and sampled.images[0].size == (64, 64)
    phases = {e.phase for e in events if e.kind == "Progress"}
    assert {"sampling", "reference", "optimization", "eval seen", "eval unseen"} <= phases
    metrics = _metrics(trainer.run_dir)
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["epoch"] for m in _metrics(trainer.run_dir, evals=True)] == [1]  # eval_every=1, last epoch: "after"
    assert [e.epoch for e in events if e.kind == "EpochSampled"] == [1, 2]
    assert [e.epoch for e in events if e.kind == "CheckpointWritten"] == [0, 0, 1, 2]
    m = metrics[0]
    assert set(m["rewards"]) == {"jpeg_compressibility"}
    for key in ("loss", "clip_fraction", "implicit_reward_mean", "implicit_reward_std", "grad_norm", "kl_old_last"):
        assert isinstance(m[key], float)
    assert m["clip_fraction"] < 1.0 and 0 < m["valid_pairs"] <= 6  # 2 prompts x C(3, 2) pairs, minus ties
    timings = m["timings"]
    assert 0 < timings["unet"] < timings["total"]
    assert set(timings) == {"sampling", "decode", "reward", "reference", "optimization", "unet", "total",
                            "unet_by_phase"}
    by_phase = timings["unet_by_phase"]
    assert by_phase["decode"] == by_phase["reward"] == 0 and 0 < by_phase["sampling"] < timings["sampling"]
    assert 0 < by_phase["optimization"] < timings["optimization"]
    assert by_phase["reference"] == 0  # a fresh LoRA is the reference model: the pass is skipped in epoch 1 only
    second = metrics[1]["timings"]
    assert 0 < second["unet_by_phase"]["reference"] < second["reference"]
    summary = events[-1].summary
    assert set(summary["eval"]) == {"seen", "unseen"}


def test_stop_during_a_mid_run_evaluation_keeps_the_finished_epoch(tiny_config):
    stop, events = threading.Event(), []

    def stop_in_eval(event):
        events.append(event)
        if event.kind == "Progress" and event.phase.startswith("eval") and event.epoch == 2:
            stop.set()
    trainer = Trainer(TrainConfig.from_dict({**tiny_config.to_dict(), "epochs": 3, "eval_every": 1}), stop_in_eval)
    trainer.run(stop)
    assert events[-1].kind == "Finished" and events[-1].cancelled
    assert events[-1].summary["stopped_after_epoch"] == 2
    assert latest_checkpoint(trainer.run_dir).name == "epoch-0002"
    assert [m["epoch"] for m in _metrics(trainer.run_dir)] == [1, 2]


def test_ddpo_objective_trains_with_the_same_loop(tiny_config):
    trainer = Trainer(TrainConfig.from_dict({**tiny_config.to_dict(), "objective": "ddpo", "epochs": 1}))
    trainer.run()
    assert "implicit_reward_mean" not in _metrics(trainer.run_dir)[0]
    assert any(v.abs().max() > 0 for k, v in _final_weights(trainer.run_dir).items() if "lora_B" in k)


# The former embedded default: the random builtin:tiny model learning JPEG compressibility (a global image property
# that needs no trained model, so it checks the learning path on any pipeline).
TINY_JPEG = dict(model="builtin:tiny", prompts="builtin:animals", eval_prompts="", rewards={"jpeg_compressibility": 1.0},
                 epochs=10, prompts_per_epoch=2, images_per_prompt=16, updates_per_epoch=4, batch_size=8, num_steps=6,
                 train_step_fraction=1.0, guidance_scale=5.0, beta=0.1, clip_range=0.1, learning_rate=3e-3,
                 eval_images_per_prompt=8, eval_max_prompts=8)


@pytest.mark.slow
def test_tiny_model_run_raises_jpeg_compressibility(tmp_path):
    """builtin:tiny, jpeg_compressibility, 10 epochs, on fixed evaluation seeds: the reward must rise by more than 4
    paired standard errors and by more than 3 unpaired ones (the seed-to-seed spread of the before and after means).
    Measured when written: +0.10 kB, about 8 paired standard errors."""
    trainer = Trainer(TrainConfig(output_dir=str(tmp_path), **TINY_JPEG))
    trainer.run()
    seen = json.loads((trainer.run_dir / "summary.json").read_text())["eval"]["seen"]
    before, after, delta = seen["before"], seen["after"], seen["delta"]
    assert before["n"] == after["n"] == 64
    assert delta["mean"] == pytest.approx(after["mean"] - before["mean"], abs=1e-5)
    assert delta["mean"] > 4 * delta["se"]
    assert after["mean"] - before["mean"] > 3 * (before["se"] ** 2 + after["se"] ** 2) ** 0.5


@pytest.mark.slow
def test_default_training_raises_the_toy_rewards_on_unseen_captions_by_3_standard_errors(tmp_path):
    """The default run (`prdp train`: the toy model, toy_match, 16 epochs, seed 0) with a 4x larger evaluation, 32
    captions x 16 fixed seeds per split: the default's 128 images per split cannot resolve one run's gain
    (docs/toy-world.md, "How large the gain is"). On unseen captions toy_match and toy_alignment (its log, per
    image) must rise by more than 3 paired standard errors. Measured with the epoch in one UNet chunk (2026-12-07;
    torch 2.13, transformers 5.24, diffusers 0.42.1, peft 0.21.2): toy_match +0.073 ± 0.013 (5.5 SE), toy_alignment
    +0.79 ± 0.12 (6.8 SE). Seeds 1 and 2 gain less (toy_match +0.028 ± 0.012 and +0.027 ± 0.012), so if a library
    update re-rolls this run's training below the bar, compare those seeds before suspecting the code."""
    trainer = Trainer(TrainConfig(output_dir=str(tmp_path), eval_max_prompts=32, eval_images_per_prompt=16))
    lora = trainer.run()
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    for split, base in (("seen", 0.707), ("unseen", 0.608)):
        evaluation = summary["eval"][split]
        assert evaluation["before"]["n"] == evaluation["after"]["n"] == 512
        assert evaluation["before"]["mean"] == pytest.approx(base, abs=0.02), split  # model + sampler + reward intact
    unseen = summary["eval"]["unseen"]
    assert unseen["delta"]["mean"] > 3 * unseen["delta"]["se"], unseen["delta"]
    alignment = torch.tensor(unseen["after"]["scores"]).clamp_min(1e-30).log() - \
        torch.tensor(unseen["before"]["scores"]).clamp_min(1e-30).log()  # toy_alignment = log toy_match
    assert alignment.mean() > 3 * alignment.std() / len(alignment) ** 0.5, alignment.mean()
    assert summary["wall_time_s"] > 0 and lora.is_file()
    for name in ("previews/before_after.png", "reward_curve.png"):
        assert (trainer.run_dir / name).is_file()
