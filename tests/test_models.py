"""Model loading paths (offline), and the memory bound of the training step."""

import pytest
import torch

from prdp_core.errors import ModelLoadError
from prdp_core.models import build_tiny_pipeline, load_pipeline
from prdp_core.objectives import EpochBatch


def test_local_diffusers_folder_loads_offline_with_identical_outputs(tmp_path):
    pipe = build_tiny_pipeline()
    pipe.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"))
    assert type(loaded.scheduler).__name__ == "DDIMScheduler"
    kwargs = dict(num_inference_steps=3, eta=1.0, output_type="pt")
    a = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = loaded("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec,message", [
    ("someone/not-downloaded-model", "hub cannot be reached"),
    ("./models/missing.safetensors", "does not exist"),
    ("builtin:huge", "unknown builtin model"),
])
def test_unloadable_models_get_actionable_errors(spec, message):
    with pytest.raises(ModelLoadError, match=message):
        load_pipeline(spec)


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


class _SavedActivations:
    """Bytes of activations autograd keeps for backward, live and at their peak."""

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        return _Held(self, tensor)

    @staticmethod
    def unpack(held):
        return held.tensor


class _Held:
    def __init__(self, meter, tensor):
        self.meter, self.tensor, self.size = meter, tensor, tensor.numel() * tensor.element_size()
        meter.live += self.size
        meter.peak = max(meter.peak, meter.live)

    def __del__(self):
        self.meter.live -= self.size


def _peak_training_activations(trainer, images):
    traj, _ = trainer.sample(trainer.train_prompts[:2], images, (0, 0), 0, "sampling", keep_trajectory=True)
    rewards = torch.arange(2 * images, dtype=torch.float32).view(2, images)  # no ties: every chunk has gradient
    batch = EpochBatch(traj.log_probs, rewards, traj.log_probs - 0.01)
    meter = _SavedActivations()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        trainer.accumulate_gradient(traj, batch, traj.log_probs)
    assert meter.live == 0  # nothing kept after the step
    return meter.peak


def test_peak_activation_memory_does_not_grow_with_images_or_steps(set_up_trainer):
    """B x T grows 7.5x between the two runs; the activations alive at once stay those of one micro-batch."""
    small = _peak_training_activations(set_up_trainer(images_per_prompt=2, num_steps=2, batch_size=2), 2)
    large = _peak_training_activations(set_up_trainer(images_per_prompt=6, num_steps=5, batch_size=2), 6)
    assert small > 0 and large == small
