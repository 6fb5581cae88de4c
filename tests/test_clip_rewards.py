"""The CLIP rewards (aesthetic, pickscore, clip_score) on tiny random weights saved in the real releases' formats,
checked against a hand computation of each reference formula."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from prdp_core.errors import RewardError
from prdp_core.clip_tokenizer import write_vocab_files
from prdp_core.rewards import create_reward
from prdp_core.rewards.clip import ClipPreprocess

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# preprocessor_config.json as openai/clip-vit-large-patch14 and laion/CLIP-ViT-H-14 ship it (sizes as plain ints).
OPENAI_PREPROCESSOR = {"crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                       "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": MEAN, "image_std": STD,
                       "resample": 3, "size": 224}
PROMPTS = ["a red fox in the snow", "an astronaut riding a horse", " ".join(["very"] * 100) + " long prompt",
           "a bowl of fruit", "x"]


def _images():
    # Odd sizes: portrait, landscape, square larger and smaller than 224, odd crop offsets.
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
            [(300, 241), (229, 400), (512, 512), (160, 160), (225, 333)]]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIPModel with its tokenizer and preprocessor_config.json, laid out like a hub CLIP repo."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("clip")
    write_vocab_files(folder, ["r e", "a n"])
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4),
        projection_dim=16, logit_scale_init_value=4.0)
    CLIPModel(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(OPENAI_PREPROCESSOR))
    return folder


@pytest.fixture(scope="module")
def processor_folder(tmp_path_factory, clip_folder):
    """A processor-only folder (as laion/CLIP-ViT-H-14 for PickScore), config in the newer dict format."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("processor")
    AutoTokenizer.from_pretrained(clip_folder).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**OPENAI_PREPROCESSOR, "size": {"shortest_edge": 224}, "crop_size": {"height": 224, "width": 224},
         "rescale_factor": 1 / 255}))
    return folder


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    """An aesthetic head state dict with the exact keys of sac+logos+ava1-l14-linearMSE.pth (input 16, not 768)."""
    torch.manual_seed(1)
    sizes = {0: (1024, 16), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    state = {}
    for index, (out_features, in_features) in sizes.items():
        state[f"layers.{index}.weight"] = torch.randn(out_features, in_features) / in_features ** 0.5
        state[f"layers.{index}.bias"] = torch.randn(out_features) * 0.1
    path = tmp_path_factory.mktemp("head") / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(state, path)
    return path


# ------------------------------------------------------------------------------------- hand computations
def hand_pixels(images, side=224):
    """CLIP preprocessing written out: bicubic resize of the shortest side, centre crop, /255, normalise."""
    out = []
    for image in images:
        w, h = image.size
        new_w, new_h = (side, side * h // w) if w <= h else (side * w // h, side)
        resized = np.asarray(image.resize((new_w, new_h), Image.BICUBIC))
        top, left = (new_h - side) // 2, (new_w - side) // 2
        crop = resized[top:top + side, left:left + side].astype(np.float32) / np.float32(255)
        out.append(torch.from_numpy((crop - np.float32(MEAN)) / np.float32(STD)).permute(2, 0, 1))
    return torch.stack(out)


def _features(output):
    # get_image_features/get_text_features return a tensor in transformers 4 and an output object in 5.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def hand_embeddings(folder, images, prompts, tokenizer_folder=None):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or folder)
    with torch.no_grad():
        image = torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=hand_pixels(images))))
        if not prompts:
            return model, image, None
        # The PickScore README's call: pad to the longest prompt (the reward pads to 77).
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        text = torch.nn.functional.normalize(_features(model.get_text_features(**tokens)))
    return model, image, text


# -------------------------------------------------------------------------------------------------- tests
def test_preprocessing_matches_transformers_pil_clip_image_processor():
    import transformers

    # The PIL processor the references ran with: CLIPImageProcessor in transformers 4, CLIPImageProcessorPil in 5.
    processor_class = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    images = _images()
    expected = processor_class(**OPENAI_PREPROCESSOR)(images=images, return_tensors="pt")["pixel_values"]
    ours = ClipPreprocess.from_config(OPENAI_PREPROCESSOR)(images)
    assert ours.shape == (5, 3, 224, 224)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours, hand_pixels(images), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_matches_reference_formula(clip_folder, head_file, tmp_path, fmt):
    path = head_file
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "head.safetensors"
        save_file(torch.load(head_file, weights_only=True), path)
    reward = create_reward("aesthetic", options={"clip": str(clip_folder), "head": str(path)})
    images = _images()
    scores = reward.score(images, [""] * len(images))

    _, embedding, _ = hand_embeddings(clip_folder, images, [])
    state = torch.load(head_file, weights_only=True)
    x = embedding
    for index in (0, 2, 4, 6, 7):  # linear layers only: dropout is off at inference, there are no activations
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    torch.testing.assert_close(scores, x.squeeze(1), rtol=1e-4, atol=1e-5)


def test_pickscore_matches_reference_formula(clip_folder, processor_folder):
    reward = create_reward("pickscore", options={"model": str(clip_folder), "processor": str(processor_folder)})
    images = _images()
    scores = reward.score(images, PROMPTS)

    model, image, text = hand_embeddings(clip_folder, images, PROMPTS, tokenizer_folder=processor_folder)
    expected = model.logit_scale.exp().detach() * (text @ image.T).diag()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    assert model.logit_scale.exp().item() == pytest.approx(np.exp(4.0))


def test_clip_score_matches_reference_formula(clip_folder):
    reward = create_reward("clip_score", options={"model": str(clip_folder)})
    images = _images()
    scores = reward.score(images, PROMPTS)

    _, image, text = hand_embeddings(clip_folder, images, PROMPTS)
    expected = 100 * torch.nn.functional.cosine_similarity(image, text)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-3)


def test_batching_gives_the_same_scores(clip_folder, processor_folder):
    images = _images()
    one_batch = create_reward("pickscore", options={"model": str(clip_folder), "processor": str(processor_folder)})
    small_batches = create_reward("pickscore", options={"model": str(clip_folder), "processor": str(processor_folder)})
    small_batches.batch_size = 2
    torch.testing.assert_close(small_batches.score(images, PROMPTS), one_batch.score(images, PROMPTS),
                               rtol=1e-5, atol=1e-5)


def test_bf16_is_close_to_fp32(clip_folder, head_file):
    images = _images()
    for name, options, prompts, tolerance in [
            ("clip_score", {"model": str(clip_folder)}, PROMPTS, 5.0),  # on a 100 * cosine scale
            ("aesthetic", {"clip": str(clip_folder), "head": str(head_file)}, [""] * 5, 0.1)]:
        fp32 = create_reward(name, dtype="fp32", options=options).score(images, prompts)
        bf16 = create_reward(name, dtype="bf16", options=options)
        assert bf16.score(images, prompts).sub(fp32).abs().max() < tolerance, name
        assert bf16.encoder.model.dtype == torch.bfloat16


@pytest.mark.parametrize("name, options, says", [
    ("aesthetic", {"clip": "/no/such/clip"}, "clip /no/such/clip does not exist; pass an existing path with "
                                             "the clip option of the aesthetic reward."),
    ("aesthetic", {"head": "./no/head.pth"}, "head ./no/head.pth does not exist; pass an existing path with "
                                             "the head option of the aesthetic reward."),
    ("aesthetic", {"head": "nobody/no-such-repo/head.pth"}, "could not get head 'nobody/no-such-repo/head.pth' from "
                                                            "the hub"),
    ("aesthetic", {"head": "head.pth"}, "could not get head 'head.pth' from the hub (neither an existing file"),
    ("pickscore", {"processor": "/no/such/processor"}, "the processor option of the pickscore reward."),
    ("pickscore", {"processor": "PROCESSOR", "model": "nobody/no-such-model"}, "could not get model "
                                                                              "'nobody/no-such-model' from the hub"),
    ("clip_score", {}, "could not get model 'openai/clip-vit-large-patch14' from the hub"),
])
def test_missing_weights_say_which_option_to_set(clip_folder, processor_folder, head_file, name, options, says):
    defaults = {"aesthetic": {"clip": str(clip_folder), "head": str(head_file)}, "pickscore": {}, "clip_score": {}}
    options = {k: str(processor_folder) if v == "PROCESSOR" else v for k, v in {**defaults[name], **options}.items()}
    reward = create_reward(name, options=options)  # nothing is loaded before the first batch
    with pytest.raises(RewardError) as error:
        reward.score(_images()[:1], ["a cat"])
    message = str(error.value)
    assert says in message and f"option of the {name} reward" in message and "\n" not in message


def test_head_that_does_not_fit_the_clip_model_is_rejected(clip_folder, tmp_path):
    state = {f"layers.{i}.weight": torch.zeros(o, n) for i, (o, n) in
             {0: (1024, 768), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items()}
    state.update({f"layers.{i}.bias": torch.zeros(o) for i, o in {0: 1024, 2: 128, 4: 64, 6: 16, 7: 1}.items()})
    torch.save(state, tmp_path / "l14.pth")
    torch.save({"weight": torch.zeros(1, 16)}, tmp_path / "other.pth")
    for head, says in [("l14.pth", "takes 768-d embeddings"), ("other.pth", "layers.0/2/4/6/7")]:
        reward = create_reward("aesthetic", options={"clip": str(clip_folder), "head": str(tmp_path / head)})
        with pytest.raises(RewardError, match=says):
            reward.score(_images()[:1], [""])
