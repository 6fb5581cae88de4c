"""The reward registry, mixes, JPEG scorers and custom black-box scorers."""

import io
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from prdp_core.errors import RewardError
from prdp_core.rewards import Reward, RewardMix, create_reward, reward_names


def _images():
    flat = Image.new("RGB", (64, 64), (120, 30, 200))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return [flat, noise]


def _jpeg_kb(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return len(buffer.getvalue()) / 1000


def test_jpeg_rewards_are_file_sizes_in_kb():
    images = _images()
    sizes = torch.tensor([_jpeg_kb(im) for im in images])
    incompressibility = create_reward("jpeg_incompressibility").score(images, ["", ""])
    compressibility = create_reward("jpeg_compressibility").score(images, ["", ""])
    assert torch.allclose(incompressibility, sizes) and torch.allclose(compressibility, -sizes)
    assert compressibility[0] > compressibility[1] + 1.0  # a flat image compresses far better than noise


def test_mix_is_the_weighted_sum_of_components():
    images = _images()
    mix = RewardMix({"jpeg_compressibility": 2.0, "jpeg_incompressibility": 0.5})
    total, components = mix.score(images, ["", ""])
    sizes = torch.tensor([_jpeg_kb(im) for im in images])
    assert torch.allclose(components["jpeg_compressibility"], -sizes)
    assert torch.allclose(total, -2.0 * sizes + 0.5 * sizes)
    assert mix.describe() == "2*jpeg_compressibility + 0.5*jpeg_incompressibility"


def test_custom_module_and_file_scorers(tmp_path, monkeypatch):
    source = textwrap.dedent("""
        def redness(images, prompts):
            return [sum(im.getpixel((0, 0))[:1]) / 255 + len(p) for im, p in zip(images, prompts)]
    """)
    (tmp_path / "my_scorers.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = _images()
    by_module = create_reward("my_scorers:redness").score(images, ["ab", "abc"])
    by_file = create_reward(f"{tmp_path / 'my_scorers.py'}:redness").score(images, ["ab", "abc"])
    expected = torch.tensor([120 / 255 + 2, images[1].getpixel((0, 0))[0] / 255 + 3])
    assert torch.allclose(by_module, expected) and torch.allclose(by_file, expected)
    sys.modules.pop("my_scorers", None)


class _Fixed(Reward):
    name = "fixed"

    def __init__(self, output):
        super().__init__()
        self.output = output

    def score_batch(self, images, prompts):
        if isinstance(self.output, Exception):
            raise self.output
        return self.output


@pytest.mark.parametrize("output,message", [
    ([1.0, float("nan")], "non-finite"),
    ([1.0, 2.0, 3.0], "returned 3 scores for 2 images"),
    ("not numbers", "not numbers"),
    (RuntimeError("CUDA error: device-side assert"), "failed while scoring: RuntimeError"),
])
def test_misbehaving_scorer_gets_a_clear_error(output, message):
    with pytest.raises(RewardError, match=message) as info:
        _Fixed(output).score(_images(), ["", ""])
    assert "'fixed'" in str(info.value)


def test_unknown_reward_names_the_closest_and_the_choices():
    with pytest.raises(RewardError) as info:
        create_reward("jpeg_compresibility")
    text = str(info.value)
    assert "did you mean 'jpeg_compressibility'" in text
    assert all(name in text for name in reward_names())
    with pytest.raises(RewardError, match="cannot be imported"):
        create_reward("no_such_module_xyz:score")
    with pytest.raises(RewardError, match="has no function"):
        create_reward("json:no_such_function")


def test_reward_options_reach_the_reward_and_unknown_ones_are_named():
    from prdp_core.rewards.base import _REGISTRY

    class Scaled(Reward):
        name = "scaled_test"

        def __init__(self, device="cpu", dtype="fp32", factor: float = 1.0):
            super().__init__(device=device, dtype=dtype)
            self.factor = factor

        def score_batch(self, images, prompts):
            return [self.factor] * len(images)

    _REGISTRY["scaled_test"] = Scaled
    try:
        mix = RewardMix({"scaled_test": 1.0}, dtype="bf16", options={"scaled_test": {"factor": 3.0}})
        assert mix.rewards["scaled_test"].dtype == torch.bfloat16
        assert mix.score(_images(), ["", ""])[0].tolist() == [3.0, 3.0]
        with pytest.raises(RewardError, match="has no option 'facter'; its options: factor"):
            create_reward("scaled_test", options={"facter": 2})
        with pytest.raises(RewardError, match="not in the reward mix"):
            RewardMix({"scaled_test": 1.0}, options={"jpeg_compressibility": {}})
        with pytest.raises(RewardError, match="reward dtype must be one of"):
            create_reward("scaled_test", dtype="fp8")
    finally:
        del _REGISTRY["scaled_test"]


def test_batch_zscore_mix_equals_hand_computation_and_keeps_raw_components():
    from prdp_core.rewards.base import _REGISTRY
    from prdp_core.rewards.mix import batch_zscore

    class Constant(Reward):
        name = "constant_test"

        def score_batch(self, images, prompts):
            return [0.1] * len(images)  # float rounding makes its std tiny, not zero: it must still count as zero

    _REGISTRY["constant_test"] = Constant
    try:
        images = _images() + [Image.new("RGB", (64, 64), (0, 0, 0))]
        mix = RewardMix({"jpeg_compressibility": 2.0, "constant_test": 5.0}, normalization="batch_zscore")
        total, components = mix.score(images, ["", "", ""])
    finally:
        del _REGISTRY["constant_test"]
    raw = -torch.tensor([_jpeg_kb(im) for im in images])
    mean, std = raw.mean(), ((raw - raw.mean()) ** 2).sum().div(len(raw) - 1).sqrt()
    assert torch.allclose(total, 2.0 * (raw - mean) / std, atol=1e-5)
    assert torch.allclose(components["jpeg_compressibility"], raw)  # logged raw, as scored
    assert torch.equal(components["constant_test"], torch.full((3,), 0.1))
    assert torch.allclose(mix.combine(components, normalize=False), 2.0 * raw + 0.5, atol=1e-5)
    assert torch.equal(batch_zscore(torch.tensor([3.0])), torch.zeros(1))  # one score: nothing to compare
    with pytest.raises(RewardError, match="normalization must be one of none, batch_zscore"):
        RewardMix({"jpeg_compressibility": 1.0}, normalization="rank")


def test_training_learns_from_zscores_but_logs_and_evaluates_raw_sums(set_up_trainer, monkeypatch):
    trainer = set_up_trainer(rewards={"jpeg_compressibility": 2.0}, reward_normalization="batch_zscore")
    results, _ = trainer.evaluate("before")
    seen = results["seen"]
    assert seen["mean"] == pytest.approx(2.0 * seen["components"]["jpeg_compressibility"]["mean"], rel=1e-5)
    assert seen["mean"] < -0.1  # raw kB, not a z-score mean of 0: comparable before and after training

    seen_by_objective = []
    loss = trainer.objective.loss
    monkeypatch.setattr(trainer.objective, "loss", lambda lp, batch: seen_by_objective.append(batch.rewards) or
                        loss(lp, batch))
    metrics = trainer.train_epoch(0)
    learned = seen_by_objective[0].flatten()
    assert learned.mean().abs() < 1e-5 and learned.std() == pytest.approx(2.0, rel=1e-4)  # 2 * z-scores
    assert metrics["reward_mean"] == pytest.approx(2.0 * metrics["rewards"]["jpeg_compressibility"]["mean"], rel=1e-5)
    assert metrics["rewards"]["jpeg_compressibility"]["std"] > 0
