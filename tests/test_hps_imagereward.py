"""`hps` and `imagereward`: their release checkpoints converted into transformers models, checked on tiny random
weights saved in the real key layout against plain-torch forwards written from the original code (OpenCLIP's
model.py/transformer.py for HPS; BLIP's vit.py/med.py and ImageReward.py for ImageReward)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from prdp_core.errors import RewardError
from prdp_core.clip_tokenizer import write_vocab_files
from prdp_core.rewards import create_reward

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]
PROMPTS = ["a red fox", "a very long prompt that the context length cuts short", "cat"]


def _images():
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))  # 48 wide, 40 high
    exact = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    large = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    return [wide, exact, large]


def _random(generator, *shape, scale=0.1):
    return torch.randn(*shape, generator=generator) * scale


def _layer_norm(x, state, key, eps):
    return F.layer_norm(x, x.shape[-1:], state[f"{key}.weight"], state[f"{key}.bias"], eps)


def _attention(q, k, v, heads, mask=None):
    batch, length, width = q.shape
    split = lambda t: t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if mask is not None:
        scores = scores + mask
    return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)


# ---------------------------------------------------------------------------------------------- HPS
V_WIDTH, T_WIDTH = 160, 128  # two heads each at OpenCLIP ViT-H-14's head widths (80 and 64)
LAYERS, PATCH, IMAGE, CONTEXT, EMBED = 2, 8, 32, 16, 24


def _open_clip_block(prefix, width, generator):
    r = lambda *shape: _random(generator, *shape)  # noqa: E731
    return {f"{prefix}ln_1.weight": 1 + r(width), f"{prefix}ln_1.bias": r(width),
            f"{prefix}attn.in_proj_weight": r(3 * width, width), f"{prefix}attn.in_proj_bias": r(3 * width),
            f"{prefix}attn.out_proj.weight": r(width, width), f"{prefix}attn.out_proj.bias": r(width),
            f"{prefix}ln_2.weight": 1 + r(width), f"{prefix}ln_2.bias": r(width),
            f"{prefix}mlp.c_fc.weight": r(4 * width, width), f"{prefix}mlp.c_fc.bias": r(4 * width),
            f"{prefix}mlp.c_proj.weight": r(width, 4 * width), f"{prefix}mlp.c_proj.bias": r(width)}


def _open_clip_state(vocab_size):
    """An OpenCLIP ViT CLIP state dict (open_clip/model.py `CLIP`) with HPSv2's key names, scaled down."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: _random(g, *shape)  # noqa: E731
    state = {"visual.class_embedding": r(V_WIDTH), "visual.positional_embedding": r((IMAGE // PATCH) ** 2 + 1, V_WIDTH),
             "visual.proj": r(V_WIDTH, EMBED), "visual.conv1.weight": r(V_WIDTH, 3, PATCH, PATCH),
             "visual.ln_pre.weight": 1 + r(V_WIDTH), "visual.ln_pre.bias": r(V_WIDTH),
             "visual.ln_post.weight": 1 + r(V_WIDTH), "visual.ln_post.bias": r(V_WIDTH),
             "token_embedding.weight": r(vocab_size, T_WIDTH), "positional_embedding": r(CONTEXT, T_WIDTH),
             "text_projection": r(T_WIDTH, EMBED), "ln_final.weight": 1 + r(T_WIDTH), "ln_final.bias": r(T_WIDTH),
             "logit_scale": torch.tensor(math.log(100.0))}
    for i in range(LAYERS):
        state.update(_open_clip_block(f"visual.transformer.resblocks.{i}.", V_WIDTH, g))
        state.update(_open_clip_block(f"transformer.resblocks.{i}.", T_WIDTH, g))
    return state


def _open_clip_resblock(x, s, p, mask=None):
    """transformer.py `ResidualAttentionBlock` (pre-LN, nn.MultiheadAttention from in_proj, nn.GELU), batch-first."""
    q, k, v = (_layer_norm(x, s, p + "ln_1", 1e-5) @ s[p + "attn.in_proj_weight"].T
               + s[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
    x = x + _attention(q, k, v, 2, mask) @ s[p + "attn.out_proj.weight"].T + s[p + "attn.out_proj.bias"]
    hidden = F.gelu(_layer_norm(x, s, p + "ln_2", 1e-5) @ s[p + "mlp.c_fc.weight"].T + s[p + "mlp.c_fc.bias"])
    return x + hidden @ s[p + "mlp.c_proj.weight"].T + s[p + "mlp.c_proj.bias"]


def _hps_by_hand(s, pixels, tokens):
    """model.py `CLIP.forward` + img_score.py: cosine of the normalised image and text features."""
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([s["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + s["visual.positional_embedding"]
    x = _layer_norm(x, s, "visual.ln_pre", 1e-5)
    for i in range(LAYERS):
        x = _open_clip_resblock(x, s, f"visual.transformer.resblocks.{i}.")
    image = _layer_norm(x[:, 0], s, "visual.ln_post", 1e-5) @ s["visual.proj"]
    t = s["token_embedding.weight"][tokens] + s["positional_embedding"]
    causal = torch.full((CONTEXT, CONTEXT), float("-inf")).triu(1)
    for i in range(LAYERS):
        t = _open_clip_resblock(t, s, f"transformer.resblocks.{i}.", causal)
    t = _layer_norm(t, s, "ln_final", 1e-5)
    text = t[torch.arange(len(t)), tokens.argmax(dim=-1)] @ s["text_projection"]  # features at the eot token
    return F.cosine_similarity(image, text, dim=-1)


def _hps_pixels_by_hand(images):
    """HPSv2's eval transform on our three images: longest side to 32 (bicubic, antialiased), zero-pad, normalise."""
    def to_tensor(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)

    def resize(t, size):
        return F.interpolate(t[None], size=size, mode="bicubic", align_corners=False, antialias=True)[0]

    wide = F.pad(resize(to_tensor(images[0]), (27, 32)), (0, 0, 2, 3))  # 40x48 -> 26.7 rounds to 27, 5 rows of pad
    exact = to_tensor(images[1])  # already 32: untouched
    large = resize(to_tensor(images[2]), (32, 32))
    return (torch.stack([wide, exact, large]) - MEAN) / STD


@pytest.fixture
def clip_tokenizer_dir(tmp_path):
    folder = tmp_path / "clip_tokenizer"
    folder.mkdir()
    write_vocab_files(folder)
    return str(folder)


@pytest.fixture
def hps_checkpoint(tmp_path, clip_tokenizer_dir):
    from transformers import CLIPTokenizer

    state = _open_clip_state(len(CLIPTokenizer.from_pretrained(clip_tokenizer_dir)))
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": {k: v.half() for k, v in state.items()}}, path)  # the release files are fp16
    return str(path), {k: v.half().float() for k, v in state.items()}


def test_hps_matches_the_open_clip_forward_by_hand(hps_checkpoint, clip_tokenizer_dir):
    from transformers import CLIPTokenizer

    path, state = hps_checkpoint
    reward = create_reward("hps", options={"checkpoint": path, "tokenizer": clip_tokenizer_dir})
    scores = reward.score(_images(), PROMPTS)
    tokenizer = CLIPTokenizer.from_pretrained(clip_tokenizer_dir)
    tokens = torch.zeros(len(PROMPTS), CONTEXT, dtype=torch.long)  # OpenCLIP's tokenize: pad with 0 to the context
    for row, prompt in zip(tokens, PROMPTS):
        ids = tokenizer(prompt).input_ids
        ids = ids[:CONTEXT - 1] + [ids[-1]] if len(ids) > CONTEXT else ids  # truncated: end-of-text stays last
        row[:len(ids)] = torch.tensor(ids)
    assert tokens[1, -1] == tokenizer.eos_token_id  # the long prompt really was cut
    expected = _hps_by_hand(state, _hps_pixels_by_hand(_images()), tokens)
    assert (scores - expected).abs().max() < 1e-4
    assert scores.std() > 1e-3  # distinct images and prompts give distinct scores: the check is not vacuous


@pytest.mark.parametrize("version, filename", [("v2", "HPS_v2_compressed.pt"), ("v2.1", "HPS_v2.1_compressed.pt")])
def test_hps_version_picks_the_hub_file(version, filename, hps_checkpoint, clip_tokenizer_dir, monkeypatch):
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name: asked.append((repo, name)) or hps_checkpoint[0])
    create_reward("hps", options={"version": version, "tokenizer": clip_tokenizer_dir}).score(_images()[:1], ["cat"])
    assert asked == [("xswu/HPSv2", filename)]


def test_hps_missing_weights_are_named(tmp_path, clip_tokenizer_dir, monkeypatch):
    import huggingface_hub

    with pytest.raises(RewardError, match="hps version must be v2 or v2.1"):
        create_reward("hps", options={"version": "v3"})
    missing = str(tmp_path / "nowhere.pt")
    with pytest.raises(RewardError, match=r"nowhere\.pt does not exist; pass the path of HPS_v2\.1_compressed\.pt"):
        create_reward("hps", options={"checkpoint": missing}).score(_images()[:1], ["cat"])

    def offline(repo, name):
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RewardError, match=r"could not get the HPS v2\.1 weights xswu/HPSv2/HPS_v2\.1_compressed\.pt"):
        create_reward("hps", options={"tokenizer": clip_tokenizer_dir}).score(_images()[:1], ["cat"])


def test_hps_damaged_checkpoints_are_named(tmp_path, hps_checkpoint, clip_tokenizer_dir):
    _, state = hps_checkpoint

    def score_with(contents):
        path = tmp_path / "broken.pt"
        path.write_bytes(contents) if isinstance(contents, bytes) else torch.save(contents, path)
        create_reward("hps", options={"checkpoint": str(path), "tokenizer": clip_tokenizer_dir}).score(
            _images()[:1], ["cat"])

    with pytest.raises(RewardError, match="could not read the HPS checkpoint .*broken.pt"):
        score_with(b"not a torch file")
    with pytest.raises(RewardError, match="holds no state dict of tensors"):
        score_with({"state_dict": {"visual.proj": "oops"}})
    with pytest.raises(RewardError, match="it has no 'visual.ln_post.weight'"):
        score_with({"state_dict": {k: v for k, v in state.items() if k != "visual.ln_post.weight"}})
    with pytest.raises(RewardError, match=r"transformer.resblocks.1.attn.out_proj.weight has shape \(128, 64\)"):
        score_with({"state_dict": {**state, "transformer.resblocks.1.attn.out_proj.weight": torch.zeros(128, 64)}})
    with pytest.raises(RewardError, match="keys a plain OpenCLIP ViT CLIP does not, e.g. 'visual.attn_pool.query'"):
        score_with({"state_dict": {**state, "visual.attn_pool.query": torch.zeros(3)}})


# ---------------------------------------------------------------------------------------------- ImageReward
BV_WIDTH, BT_WIDTH, B_LAYERS, MAX_POSITIONS = 192, 128, 2, 40  # heads of 64: 3 and 2
HEAD_SIZES = [BT_WIDTH, 32, 16, 8, 4, 1]
HEAD_INDICES = [0, 2, 4, 6, 7]  # ImageReward.py's MLP: Dropouts sit between its Linears
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "fox", "cat", "very", "long", "prompt",
              "that", "the", "context", "length", "cuts", "short"]


def _blip_state():
    """ImageReward.pt's layout: BLIP_Pretrain (vit.py VisionTransformer, med.py BertModel, the unused projections
    and med.py's saved position ids) plus the MLP head, scaled down."""
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: _random(g, *shape)  # noqa: E731
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    state = {f"{v}cls_token": r(1, 1, BV_WIDTH), f"{v}pos_embed": r(1, (IMAGE // PATCH) ** 2 + 1, BV_WIDTH),
             f"{v}patch_embed.proj.weight": r(BV_WIDTH, 3, PATCH, PATCH), f"{v}patch_embed.proj.bias": r(BV_WIDTH),
             f"{v}norm.weight": 1 + r(BV_WIDTH), f"{v}norm.bias": r(BV_WIDTH),
             f"{t}embeddings.position_ids": torch.arange(MAX_POSITIONS)[None],
             f"{t}embeddings.word_embeddings.weight": r(len(BERT_WORDS), BT_WIDTH),
             f"{t}embeddings.position_embeddings.weight": r(MAX_POSITIONS, BT_WIDTH),
             f"{t}embeddings.LayerNorm.weight": 1 + r(BT_WIDTH), f"{t}embeddings.LayerNorm.bias": r(BT_WIDTH),
             "blip.vision_proj.weight": r(16, BV_WIDTH), "blip.vision_proj.bias": r(16),
             "blip.text_proj.weight": r(16, BT_WIDTH), "blip.text_proj.bias": r(16)}
    for i in range(B_LAYERS):
        p = f"{v}blocks.{i}."
        for name, shape in (("norm1", (BV_WIDTH,)), ("norm2", (BV_WIDTH,)), ("attn.qkv", (3 * BV_WIDTH, BV_WIDTH)),
                            ("attn.proj", (BV_WIDTH, BV_WIDTH)), ("mlp.fc1", (4 * BV_WIDTH, BV_WIDTH)),
                            ("mlp.fc2", (BV_WIDTH, 4 * BV_WIDTH))):
            state[f"{p}{name}.weight"] = r(*shape) + (1 if name.startswith("norm") else 0)
            state[f"{p}{name}.bias"] = r(shape[0])
        p = f"{t}encoder.layer.{i}."
        for name, shape in (("attention.self.query", (BT_WIDTH, BT_WIDTH)),
                            ("attention.self.key", (BT_WIDTH, BT_WIDTH)),
                            ("attention.self.value", (BT_WIDTH, BT_WIDTH)),
                            ("attention.output.dense", (BT_WIDTH, BT_WIDTH)),
                            ("attention.output.LayerNorm", (BT_WIDTH,)),
                            ("crossattention.self.query", (BT_WIDTH, BT_WIDTH)),
                            ("crossattention.self.key", (BT_WIDTH, BV_WIDTH)),
                            ("crossattention.self.value", (BT_WIDTH, BV_WIDTH)),
                            ("crossattention.output.dense", (BT_WIDTH, BT_WIDTH)),
                            ("crossattention.output.LayerNorm", (BT_WIDTH,)),
                            ("intermediate.dense", (2 * BT_WIDTH, BT_WIDTH)),
                            ("output.dense", (BT_WIDTH, 2 * BT_WIDTH)),
                            ("output.LayerNorm", (BT_WIDTH,))):
            state[f"{p}{name}.weight"] = r(*shape) + (1 if name.endswith("LayerNorm") else 0)
            state[f"{p}{name}.bias"] = r(shape[0])
    for index, (fan_in, fan_out) in zip(HEAD_INDICES, zip(HEAD_SIZES, HEAD_SIZES[1:])):
        # larger than the rest so the score spreads and small errors upstream show
        state[f"mlp.layers.{index}.weight"], state[f"mlp.layers.{index}.bias"] = 3 * r(fan_out, fan_in), r(fan_out)
    return state


def _linear(x, s, key):
    return x @ s[f"{key}.weight"].T + s[f"{key}.bias"]


def _imagereward_by_hand(s, pixels, ids, mask):
    """ImageReward.py `score`: vit.py forward, med.py BertModel (post-LN, cross-attention to all image tokens),
    MLP on the [CLS] output, standardised."""
    v, t = "blip.visual_encoder.", "blip.text_encoder."
    x = F.conv2d(pixels, s[f"{v}patch_embed.proj.weight"], s[f"{v}patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([s[f"{v}cls_token"].expand(len(x), 1, -1), x.flatten(2).transpose(1, 2)], dim=1) + s[f"{v}pos_embed"]
    for i in range(B_LAYERS):
        p = f"{v}blocks.{i}."
        q, k, vv = _linear(_layer_norm(x, s, p + "norm1", 1e-6), s, p + "attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attention(q, k, vv, 3), s, p + "attn.proj")
        x = x + _linear(F.gelu(_linear(_layer_norm(x, s, p + "norm2", 1e-6), s, p + "mlp.fc1")), s, p + "mlp.fc2")
    image = _layer_norm(x, s, f"{v}norm", 1e-6)

    h = s[f"{t}embeddings.word_embeddings.weight"][ids] + s[f"{t}embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = _layer_norm(h, s, f"{t}embeddings.LayerNorm", 1e-12)
    padding = (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    for i in range(B_LAYERS):
        p = f"{t}encoder.layer.{i}."
        for block, keys, extra in (("attention", h, padding), ("crossattention", image, None)):
            q, k, vv = (_linear(src, s, f"{p}{block}.self.{name}")
                        for name, src in (("query", h), ("key", keys), ("value", keys)))
            h = _layer_norm(_linear(_attention(q, k, vv, 2, extra), s, f"{p}{block}.output.dense") + h, s,
                            f"{p}{block}.output.LayerNorm", 1e-12)
        h = _layer_norm(_linear(F.gelu(_linear(h, s, p + "intermediate.dense")), s, p + "output.dense") + h, s,
                        p + "output.LayerNorm", 1e-12)
    out = h[:, 0]
    for index in HEAD_INDICES:
        out = _linear(out, s, f"mlp.layers.{index}")
    return (out.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def _imagereward_pixels_by_hand(images):
    """ImageReward's transform on our three images: shorter side to 32 (PIL bicubic), centre crop, normalise."""
    def to_tensor(image):
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)

    wide = images[0].resize((38, 32), Image.BICUBIC).crop((3, 0, 35, 32))  # 48x40 -> int(32*48/40)=38 wide
    return (torch.stack([to_tensor(wide), to_tensor(images[1]), to_tensor(images[2].resize((32, 32), Image.BICUBIC))])
            - MEAN) / STD


@pytest.fixture
def bert_tokenizer_dir(tmp_path):
    folder = tmp_path / "bert_tokenizer"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    return str(folder)


def test_imagereward_matches_the_blip_forward_by_hand(tmp_path, bert_tokenizer_dir):
    from transformers import BertTokenizer

    state = _blip_state()
    path = tmp_path / "ImageReward.pt"
    torch.save(state, path)  # ImageReward.pt is a bare state dict
    reward = create_reward("imagereward", options={"checkpoint": str(path), "tokenizer": bert_tokenizer_dir})
    scores = reward.score(_images(), PROMPTS)
    text = BertTokenizer.from_pretrained(bert_tokenizer_dir)(PROMPTS, padding="max_length", truncation=True,
                                                             max_length=35, return_tensors="pt")
    assert text.attention_mask[:, -1].tolist() == [0, 0, 0] and text.attention_mask[1].sum() > 5  # real padding
    expected = _imagereward_by_hand(state, _imagereward_pixels_by_hand(_images()), text.input_ids, text.attention_mask)
    assert (scores - expected).abs().max() < 1e-4
    assert scores.std() > 1e-3


def test_imagereward_damaged_or_foreign_checkpoints_are_named(tmp_path, hps_checkpoint, bert_tokenizer_dir):
    def score_with(path):
        create_reward("imagereward", options={"checkpoint": str(path), "tokenizer": bert_tokenizer_dir}).score(
            _images()[:1], ["cat"])

    with pytest.raises(RewardError, match="not an ImageReward checkpoint: it has no 'blip.visual_encoder.cls_token'"):
        score_with(hps_checkpoint[0])
    state = _blip_state()
    state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"] = torch.zeros(BT_WIDTH, 7)
    torch.save(state, tmp_path / "mixed.pt")
    with pytest.raises(RewardError, match=r"crossattention.self.key.weight has shape \(128, 7\)"):
        score_with(tmp_path / "mixed.pt")
    with pytest.raises(RewardError, match=r"ImageReward checkpoint .*missing.pt does not exist; pass the path of "
                                          r"ImageReward\.pt"):
        score_with(tmp_path / "missing.pt")


def test_hps_cleans_prompts_as_open_clip_does(hps_checkpoint, clip_tokenizer_dir):
    # OpenCLIP's tokenizer unescapes HTML (twice) and collapses whitespace before BPE; prompts scraped from the web
    # carry both, and the reward must score the text its model was trained on
    path, _ = hps_checkpoint
    reward = create_reward("hps", options={"checkpoint": path, "tokenizer": clip_tokenizer_dir})
    images = _images()[:2]
    raw = reward.score(images, ["a cat &amp;amp; a dog", "  a red\n\tcar  "])
    clean = reward.score(images, ["a cat & a dog", "a red car"])
    assert torch.equal(raw, clean)


def test_imagereward_head_stays_fp32_in_a_bf16_reward(tmp_path, bert_tokenizer_dir):
    # the head turns a 768-d feature into one score: bf16's 8-bit mantissa there moves scores by ~0.05 (as the
    # aesthetic reward's head, it is kept in fp32 while the towers run in the reward dtype)
    path = tmp_path / "ImageReward.pt"
    torch.save(_blip_state(), path)
    reward = create_reward("imagereward", dtype="bf16", options={"checkpoint": str(path),
                                                                  "tokenizer": bert_tokenizer_dir})
    seen = []
    reward.ensure_loaded()
    reward.model.head.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0].dtype,
                                                                                         output.dtype)))
    reward.score(_images(), PROMPTS)
    assert seen == [(torch.float32, torch.float32)]
