"""Memory-lean training: the options change memory and time, never the gradient; fp16 gradient scaling; the text
cache; the low-VRAM preset; per-phase metering."""

import time

import pytest
import torch

from prdp_core import TrainConfig, Trainer
from prdp_core import trainer as trainer_module
from prdp_core.cli import build_parser, resolve_train_config
from prdp_core.config import LOW_VRAM
from prdp_core.errors import ConfigError
from prdp_core.objectives import EpochBatch
from prdp_core.sampling import PhaseMeter


def _gradient(trainer: Trainer, traj, current) -> torch.Tensor:
    rewards = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -0.5]])
    batch = EpochBatch(current, rewards, current - 1e-3)
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradient(traj, batch, current)
    return torch.cat([p.grad.flatten() for p in trainer.params])


def _trained_looking(trainer: Trainer) -> None:
    torch.manual_seed(3)
    for name, param in trainer.unet.named_parameters():
        if "lora_B" in name:  # non-zero B, so lora_A gets gradient too
            param.data.normal_(0.0, 0.05)


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-xl"])
def test_gradient_checkpointing_leaves_the_gradient_unchanged(set_up_trainer, model):
    plain = set_up_trainer(model=model)
    _trained_looking(plain)
    traj, _ = plain.sample(plain.train_prompts[:2], 3, (0, 0), 0, "sampling", keep_trajectory=True)
    current = plain.sampler.all_log_probs(traj)
    expected = _gradient(plain, traj, current)
    checkpointed = set_up_trainer(model=model, gradient_checkpointing=True)
    _trained_looking(checkpointed)
    assert checkpointed.unet.is_gradient_checkpointing
    got = _gradient(checkpointed, traj, current)
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)


def test_fp16_gradient_is_scaled_and_unscaled_and_retried_on_overflow(set_up_trainer, monkeypatch):
    reference = set_up_trainer()
    _trained_looking(reference)
    traj, _ = reference.sample(reference.train_prompts[:2], 3, (0, 0), 0, "sampling", keep_trajectory=True)
    current = reference.sampler.all_log_probs(traj)
    exact = _gradient(reference, traj, current)

    half = set_up_trainer(precision="fp16")
    _trained_looking(half)
    scaled = _gradient(half, traj, current)
    assert torch.isfinite(scaled).all()
    assert (scaled - exact).norm() / exact.norm() < 0.1  # fp16 rounding only: a missing unscale would be 2**16 off

    # A scale far beyond fp16's range overflows; the chunk is recomputed at smaller scales until it fits.
    monkeypatch.setattr(trainer_module, "FP16_GRAD_EXPONENT", 30)
    calls = []
    original = half.sampler.chunk_log_probs
    monkeypatch.setattr(half.sampler, "chunk_log_probs", lambda *a: calls.append(1) or original(*a))
    retried = _gradient(half, traj, current)
    assert len(calls) > len(traj.chunks()) * traj.shape[2]  # some chunks ran more than once
    # the same gradient up to fp16 rounding, which is relative to the whole vector, not to its near-zero entries
    assert (retried - scaled).norm() / scaled.norm() < 1e-3  # measured 6e-5 to 8e-5


def test_prompts_are_encoded_once_per_run(set_up_trainer):
    trainer = set_up_trainer(model="builtin:tiny-xl", offload_models=True)
    sampler = trainer.sampler
    encoded = []
    for encoder in (trainer.pipe.text_encoder, trainer.pipe.text_encoder_2):
        encoder.register_forward_hook(lambda module, args, out: encoded.append(args[0].shape[0]))
    cond, negative = sampler.encode_prompts(["a cat", "a dog"])
    assert cond.embeds.shape[0] == 2 and cond.pooled.shape[0] == 2 and negative.embeds.shape[0] == 1
    assert not negative.embeds.any() and not negative.pooled.any()  # SDXL: zeros for an empty negative prompt
    calls = len(encoded)
    again, _ = sampler.encode_prompts(["a dog", "a cat", "a dog"])
    assert len(encoded) == calls  # nothing new to encode
    assert torch.equal(again.embeds[1], cond.embeds[0]) and torch.equal(again.pooled[0], cond.pooled[1])
    sampler.encode_prompts(["a cat", "a bird"])
    assert encoded[calls:] == [1, 1]  # only the new prompt, once per text encoder


def test_phase_meter_meters_nested_phases_exclusively():
    meter = PhaseMeter(torch.device("cpu"))
    with meter.phase("sampling"):
        time.sleep(0.05)
        with meter.clock.timed():  # a UNet call
            time.sleep(0.03)
        with meter.phase("decode"):
            time.sleep(0.1)
            with meter.clock.timed():
                time.sleep(0.02)
    assert 0.07 < meter.seconds["sampling"] < 0.12 and 0.11 < meter.seconds["decode"] < 0.17
    assert 0.025 < meter.unet_seconds["sampling"] < 0.045 and 0.015 < meter.unet_seconds["decode"] < 0.035
    assert meter.peak_gib == {}  # memory is metered on CUDA only


def test_low_vram_preset_applies_under_explicit_flags(tmp_path):
    args = build_parser().parse_args(["train", "--low-vram", "--batch-size", "2", "--no-vae-tiling"])
    config = resolve_train_config(args)
    assert config.batch_size == 2 and config.vae_tiling is False  # explicit flags win
    assert (config.precision, config.gradient_checkpointing, config.offload_models) == ("fp16", True, True)
    assert set(LOW_VRAM) <= set(config.to_dict())
    config.save(tmp_path / "run.toml")
    assert TrainConfig.load(tmp_path / "run.toml") == config
    with pytest.raises(ConfigError, match="gradient_checkpointing must be true or false"):
        TrainConfig(gradient_checkpointing=1).validate()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lora_computes_in_the_base_dtype_from_fp32_parameters(dtype):
    """As autocast would: no fp32 copy of a layer's input is kept for the backward pass (PEFT's default costs ~2.5
    GiB at SD1.5 512 px), the output is the half-precision LoRA sum, and the gradient reaches the fp32 parameters."""
    from peft.tuners.lora import LoraLayer

    from prdp_core.config import KOHYA_UNET_TARGETS
    from prdp_core.models import add_lora, build_tiny_pipeline, lora_parameters

    unet = build_tiny_pipeline().unet.to(dtype)
    add_lora(unet, 4, 8.0, KOHYA_UNET_TARGETS)
    assert {p.dtype for p in lora_parameters(unet)} == {torch.float32}
    for kind in (torch.nn.Linear, torch.nn.Conv2d):
        name, layer = next((n, m) for n, m in unet.named_modules()
                           if isinstance(m, LoraLayer) and isinstance(m.base_layer, kind))
        torch.manual_seed(0)
        layer.lora_B["default"].weight.data.normal_(0.0, 0.5)
        shape = (2, 5, layer.base_layer.in_features) if kind is torch.nn.Linear else (2, layer.base_layer.in_channels, 4, 4)
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = layer(x)
        assert out.dtype == dtype
        assert not [t.shape for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()], name
        a, b = (getattr(layer, f)["default"] for f in ("lora_A", "lora_B"))
        half = {m: m.weight.detach().to(dtype) for m in (a, b)}
        if kind is torch.nn.Linear:
            delta = torch.nn.functional.linear(torch.nn.functional.linear(x, half[a]), half[b])
        else:
            delta = b._conv_forward(a._conv_forward(x, half[a], None), half[b], None)
        expected = layer.base_layer(x) + delta * layer.scaling["default"]
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out.float().sum().backward()
        assert a.weight.grad.dtype == b.weight.grad.dtype == torch.float32 and a.weight.grad.abs().max() > 0


@pytest.mark.parametrize("overrides,where,named,not_named", [
    ({}, "train_epoch", ["gradient_checkpointing", "batch_size (now 2)", "fp16"], ["vae_tiling", "decode"]),
    ({}, "decode", ["in decode", "vae_tiling", "gradient_checkpointing"], []),  # the fix for that phase first
    ({"retain_graphs": "on", "gradient_checkpointing": True, "batch_size": 1}, "train_epoch",
     ["retain_graphs off", "fp16"], ["gradient_checkpointing", "batch_size"]),  # only what is still left to change
    ({**LOW_VRAM, "vae_tiling": False}, "train_epoch", ["vae_tiling", "resolution"], ["batch_size", "fp16"]),
    (LOW_VRAM, "decode", ["resolution"], ["vae_tiling", "gradient_checkpointing"]),
])
def test_running_out_of_memory_says_what_to_change_and_keeps_the_run(tiny_config, monkeypatch, overrides, where,
                                                                     named, not_named):
    from prdp_core import checkpoints
    from prdp_core.sampling import Sampler

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(Trainer if where == "train_epoch" else Sampler, where, out_of_memory)
    trainer = Trainer(TrainConfig.from_dict({**tiny_config.to_dict(), **overrides}))
    with pytest.raises(trainer_module.PrdpError) as raised:
        trainer.run()
    message = str(raised.value)
    assert message.startswith("out of GPU memory") and message.endswith(f"then resume the run {trainer.run_dir}.")
    assert "\n" not in message and all(words in message for words in named), message
    assert not any(words in message for words in not_named), message
    assert checkpoints.latest_checkpoint(trainer.run_dir) is not None  # resumable: a checkpoint precedes all work


def test_auto_batch_size_fits_the_device_and_evens_out_chunks(monkeypatch):
    from prdp_core import memory

    small, large = torch.nn.Linear(4, 4), torch.nn.Module()
    monkeypatch.setattr(memory, "is_small", lambda unet: unet is small)
    cpu = torch.device("cpu")
    assert memory.auto_batch_size(32, cpu, small, None) == 32  # the toy default's epoch in one call
    assert memory.auto_batch_size(100, cpu, small, None) == 50  # at most 64: two even chunks, not 64 + 36
    assert memory.auto_batch_size(32, cpu, large, None) == 4

    # a GPU: 2 GiB used by the model, 14 GiB free; a chunk peaks at 3 GiB + 1 GiB per image
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (14 * gib, 16 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * gib)
    measured = []

    def peak(images):
        measured.append(images)
        return (3 + images) * gib
    cuda = torch.device("cuda")
    # budget 2 + 0.75 x 14 = 12.5 GiB: 9 images peak at 12 GiB, 10 at 13; 32 images go as 4 chunks of 8
    assert memory.auto_batch_size(32, cuda, small, peak) == 8 and measured == [1, 2]
    assert memory.auto_batch_size(6, cuda, small, peak) == 6
    assert memory.fitting_batch(4 * gib, 5 * gib, 12.5 * gib) == 9
    assert memory.fitting_batch(20 * gib, 21 * gib, 12.5 * gib) == 1  # nothing fits: the smallest chunk, and advice


def test_batch_size_auto_on_the_cpu_puts_a_small_epoch_in_one_chunk(set_up_trainer):
    trainer = set_up_trainer(batch_size=0)
    assert trainer.batch_size == 6
    traj, _ = trainer.sample(trainer.train_prompts[:2], 3, (0, 0), 1, "sampling", keep_trajectory=True)
    assert traj.chunks() == [slice(0, 6)]
