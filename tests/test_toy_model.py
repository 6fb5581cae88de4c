"""The shipped toy base model: a real diffusers folder that loads offline and draws what it is asked for."""

import json
import time

import pytest

from prdp_core.models import TOY_MODEL_DIR, load_pipeline
from prdp_core.toy.train_model import alignment_accuracy, evaluation_prompts, learn_merges
from prdp_core.toy.world import all_scenes


def test_loads_offline_with_stock_diffusers():
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    pipe = StableDiffusionPipeline.from_pretrained(str(TOY_MODEL_DIR), local_files_only=True)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.vae_scale_factor * pipe.unet.config.sample_size == 64
    size = sum(p.stat().st_size for p in TOY_MODEL_DIR.rglob("*") if p.is_file())
    assert size <= 25 * 2**20


def test_tokenizer_makes_every_toy_word_one_token_in_both_tokenizer_kinds():
    from transformers import CLIPTokenizer

    slow = CLIPTokenizer(str(TOY_MODEL_DIR / "tokenizer" / "vocab.json"), str(TOY_MODEL_DIR / "tokenizer" / "merges.txt"))
    words = {w for s in all_scenes() for w in s.caption.replace(",", " ,").split()}
    for word in sorted(words):
        assert slow.tokenize(word) == [word + "</w>"], word
    pipe = load_pipeline("builtin:toy")
    caption = all_scenes()[5].caption
    assert pipe.tokenizer(caption).input_ids == slow(caption).input_ids
    assert len(pipe.tokenizer(caption).input_ids) == 12
    assert pipe.tokenizer("a photo of a dog").input_ids[1:-1]  # other text still tokenises, by characters


def test_text_encoder_file_is_read_by_transformers_4_as_well(tmp_path):
    """Transformers 5 saves CLIPTextModel without the `text_model.` prefix that 4.x (A1111, Forge) needs; 4.x would
    load nothing and draw from a random text encoder. The shipped file and the training script use the prefix."""
    import torch
    from safetensors import safe_open
    from transformers import CLIPTextConfig, CLIPTextModel

    from prdp_core.models import make_text_encoder_portable

    with safe_open(str(TOY_MODEL_DIR / "text_encoder" / "model.safetensors"), "pt") as shipped:
        assert all(key.startswith("text_model.") for key in shipped.keys())
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                         num_hidden_layers=1, vocab_size=99, max_position_embeddings=16)).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)  # the default of transformers 4.35 on
    make_text_encoder_portable(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as written:
        assert all(key.startswith("text_model.") for key in written.keys())
    ids = torch.tensor([[0, 5, 17, 98, 1]])
    with torch.no_grad():
        assert torch.equal(CLIPTextModel.from_pretrained(tmp_path)(ids)[0], model(ids)[0])


def test_learn_merges_reaches_one_token_per_word():
    merges = learn_merges({"red": 3, "green": 2, "reed": 1})
    pieces = {}
    for word in ("red", "green", "reed"):
        split = list(word[:-1]) + [word[-1] + "</w>"]
        for a, b in merges:  # apply in rank order, as a BPE tokenizer does
            i = 0
            while i < len(split) - 1:
                if (split[i], split[i + 1]) == (a, b):
                    split[i:i + 2] = [a + b]
                else:
                    i += 1
        pieces[word] = split
    assert pieces == {"red": ["red</w>"], "green": ["green</w>"], "reed": ["reed</w>"]}


def test_training_report_states_the_shipped_quality():
    report = json.loads((TOY_MODEL_DIR / "training_report.json").read_text())
    for split in ("train", "unseen"):
        assert 0.5 <= report[f"{split}_T50"]["both"] < 0.95  # recognisable, with room to improve


SECONDS_PER_IMAGE_STEP = 0.006  # docs/toy-world.md: 64 images x 6 DDIM steps (guidance on) + decode in ~2.3 s on 2 cores


@pytest.mark.slow
def test_draws_the_prompted_colour_and_shape_on_unseen_prompts():
    """32 held-out captions x 2 fixed seeds, 50 DDIM steps: the classifier must read the prompted colour and shape
    on at least half of the images (the issue's bar; the shipped figures are in training_report.json), at the
    speed order of docs/toy-world.md (within 10x: CI machines differ)."""
    pipe = load_pipeline("builtin:toy")
    start = time.perf_counter()
    accuracy = alignment_accuracy(pipe, evaluation_prompts("unseen", 32, seed=3), 2, 50, guidance_scale=5.0, seed=5)
    seconds = time.perf_counter() - start
    assert accuracy["both"] >= 0.5, accuracy
    assert accuracy["shape"] >= 0.8, accuracy
    assert seconds / (64 * 50) < 10 * SECONDS_PER_IMAGE_STEP, seconds
