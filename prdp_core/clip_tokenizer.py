"""The CLIP tokenizers of Stable Diffusion, built offline from the BPE file shipped in prdp_core/model_configs.

Every SD text encoder (CLIP ViT-L/14 for SD1 and SDXL, OpenCLIP ViT-H/14 for SD2, OpenCLIP ViT-bigG/14 for SDXL)
uses OpenAI's CLIP byte-level BPE; the hub repos only differ in the padding token. Single-file checkpoints carry no
tokenizer, and diffusers would download one, so we rebuild the hub's vocab.json and merges.txt from the BPE merges
exactly as OpenAI's SimpleTokenizer builds its vocabulary.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import tempfile
from pathlib import Path
from typing import Sequence

CONFIGS_DIR = Path(__file__).parent / "model_configs"
BPE_FILE = CONFIGS_DIR / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408  # 256 bytes + 256 bytes with "</w>" + 48894 merges + 2 special tokens
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP keeps: the vocabulary was cut at 49152 entries before the specials
MERGES_HEADER = "#version: 0.2"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's table of one printable character per byte, in byte-vocabulary order: the printable bytes
    keep their own character, the others are shifted above 255 so BPE never sees whitespace or control bytes."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + shifted)
            shifted += 1
    return [chr(c) for c in chars]


@functools.lru_cache(maxsize=1)
def clip_merges() -> tuple[str, ...]:
    """The 48894 merge lines ("a b") CLIP uses, from the shipped BPE file (its first line is a header)."""
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    return tuple(lines[1:NUM_MERGES + 1])


def byte_level_vocab(merges: Sequence[str] = ()) -> dict[str, int]:
    """Token -> id, in SimpleTokenizer's order: bytes, bytes + "</w>", each merge ("a b") joined, the two specials."""
    chars = bytes_to_unicode()
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars] + [line.replace(" ", "") for line in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return vocab


def clip_vocab() -> dict[str, int]:
    return byte_level_vocab(clip_merges())


def write_vocab_files(folder: str | os.PathLike, merges: Sequence[str] = ()) -> None:
    """vocab.json and merges.txt of the byte-level vocabulary plus `merges` ("a b" lines), as the SD/CLIP hub repos
    hold them: the files every transformers version's CLIPTokenizer reads (transformers 5 saves only
    tokenizer.json)."""
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(byte_level_vocab(merges), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(MERGES_HEADER + "\n" + "".join(m + "\n" for m in merges), encoding="utf-8")


def write_clip_vocab_files(folder: str | os.PathLike) -> None:
    write_vocab_files(folder, clip_merges())


def build_tokenizer(merges: Sequence[str] = (), pad_token: str | None = None, model_max_length: int = 77):
    """A transformers CLIPTokenizer over the byte-level vocabulary plus `merges`, built without any download (no
    merges: every word splits into characters, yet any text tokenises deterministically)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as folder:  # the file-based constructor works in transformers 4.x and 5.x
        write_vocab_files(folder, merges)
        extra = {"pad_token": pad_token} if pad_token else {}
        return CLIPTokenizer.from_pretrained(folder, model_max_length=model_max_length, **extra)


def pad_token_of(tokenizer_folder: str | os.PathLike) -> str:
    """The padding token a hub tokenizer folder declares. special_tokens_map.json wins over tokenizer_config.json,
    as in transformers: SD2's folder says "<|endoftext|>" in the latter but pads with "!" (OpenCLIP pads with id 0)."""
    folder = Path(tokenizer_folder)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file():
            pad = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if pad is not None:
                return pad["content"] if isinstance(pad, dict) else pad
    return EOS


def build_clip_tokenizer(pad_token: str = EOS, model_max_length: int = 77):
    """A transformers CLIPTokenizer with CLIP's full vocabulary, built without any download."""
    return build_tokenizer(clip_merges(), pad_token, model_max_length)


def tokenizers_for(config_folder: str | os.PathLike) -> dict:
    """{"tokenizer": ..., "tokenizer_2": ...} for a diffusers config folder: CLIP's tokenizer padded as the folder's
    tokenizer configs say, or the folder's own tokenizer where it ships a complete one (vocabulary included)."""
    from transformers import CLIPTokenizer

    folder = Path(config_folder)
    names = ["tokenizer"] + (["tokenizer_2"] if (folder / "tokenizer_2").is_dir() or _index_has(folder, "tokenizer_2")
                             else [])
    tokenizers = {}
    for name in names:
        subfolder = folder / name
        if (subfolder / "vocab.json").is_file() or (subfolder / "tokenizer.json").is_file():
            tokenizers[name] = CLIPTokenizer.from_pretrained(subfolder)
        else:
            tokenizers[name] = build_clip_tokenizer(pad_token=pad_token_of(subfolder))
    return tokenizers


def _index_has(folder: Path, component: str) -> bool:
    try:
        entry = json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get(component)
    except (OSError, ValueError):
        return False
    return bool(entry and entry[0])
