"""Prompt sources and the per-epoch prompt draw.

Training reads its prompts as a sequence that stays on disk (`open_prompts`): a text file through an index of its
line offsets, a Hugging Face dataset column through the library's memory-mapped cache. An epoch reads only the prompts
it draws, so memory does not grow with the prompts seen, and a file of millions of lines opens in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PromptError

BUILTIN_PREFIX = "builtin:"
DATASET_PREFIX = "hf:"
DATASET_COLUMNS = ("prompt", "text", "caption")  # the column used when the source names none, first found


def builtin_prompt_sets() -> list[str]:
    folder = resources.files(__package__) / "prompt_sets"
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


def open_prompts(source: str | Sequence[str]) -> Sequence[str]:
    """The prompts of `source` as a sequence: a text file or `hf:NAME[:split[:column]]` read lazily (see the module
    docstring), anything else as load_prompts gives it. Raises PromptError like load_prompts."""
    if isinstance(source, str) and source.startswith(DATASET_PREFIX):
        return DatasetPrompts(source)
    if isinstance(source, str) and not source.startswith(BUILTIN_PREFIX) and Path(source).suffix.lower() != ".json":
        try:
            return FilePrompts(_existing_file(source))
        except _OtherLineBreaks:  # lines that str.splitlines() splits further: read as load_prompts reads them
            pass
    return load_prompts(source)


class _OtherLineBreaks(Exception):
    pass


class FilePrompts(Sequence[str]):
    """The prompts of a text file (one per line, `#` comments and blank lines skipped), read from disk when used;
    only their byte offsets stay in memory (8 bytes a prompt)."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets = array("q")
        offset = 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError:
                    raise PromptError(f"prompt file {path} is not UTF-8 text (line {number}); save it as UTF-8 with "
                                      f"one prompt per line.") from None
                if len(text.splitlines()) > 1:  # \r alone, \u2028, form feeds...: not one prompt per \n
                    raise _OtherLineBreaks()
                text = text.strip()
                if text and not text.startswith("#"):
                    self.offsets.append(offset)
                offset += len(line)
        _checked(self.offsets, str(path))

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        with open(self.path, "rb") as f:
            f.seek(self.offsets[index])
            return f.readline().decode("utf-8").strip()


class DatasetPrompts(Sequence[str]):
    """A string column of a Hugging Face dataset, `hf:NAME[:split[:column]]` (split: train; column: the first of
    DATASET_COLUMNS it has, or its only string column). NAME is a hub id or a local dataset folder; `datasets` loads
    it into its cache (memory-mapped Arrow) and is imported only here. Rows without text are skipped."""

    def __init__(self, source: str):
        name, split, column = (source[len(DATASET_PREFIX):].split(":") + ["", ""])[:3]
        split = split or "train"
        try:
            import datasets
        except ImportError:
            raise PromptError(f"prompts {source} need the datasets library; install it with pip install datasets, "
                              f"or give the prompts as a text file.") from None
        try:
            table = datasets.load_dataset(name, split=split).data
        except ConnectionError:
            raise PromptError(f"Hugging Face dataset {name} is not in the local cache and the hub cannot be reached; "
                              f"download it once while online, or give the prompts as a text file.") from None
        except Exception as exc:  # the library's own errors for a wrong name, split or file
            reason = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
            raise PromptError(f"Hugging Face dataset {name} (split {split}) could not be loaded ({reason}); check "
                              f"the name and split, as hf:NAME[:split[:column]].") from None
        texts = [n for n in table.column_names if str(table.schema.field(n).type) in ("string", "large_string")]
        column = column or next((c for c in DATASET_COLUMNS if c in texts), texts[0] if len(texts) == 1 else "")
        if column not in texts:
            wanted = column or " or ".join(DATASET_COLUMNS)
            raise PromptError(f"Hugging Face dataset {name} has no text column {wanted}; name one of its text "
                              f"columns ({', '.join(texts) or 'it has none'}) as hf:{name}:{split}:COLUMN.")
        import pyarrow.compute as pc

        self.column = table.column(column)
        has_text = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(self.column)), 0), False)
        self.rows = np.flatnonzero(has_text.to_numpy(zero_copy_only=False))
        _checked(self.rows, source)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self.column[int(self.rows[index])].as_py().strip()


def load_prompts(source: str | Sequence[str]) -> list[str]:
    """Prompts from a builtin set (`builtin:NAME`), a .txt file (one per line, `#` comments), a .json list,
    or an in-memory list. Raises PromptError for missing, empty or malformed sources."""
    if not isinstance(source, str):
        return _checked([str(p).strip() for p in source if str(p).strip()], "the prompt list")
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        path = resources.files(__package__) / "prompt_sets" / f"{name}.txt"
        if not path.is_file():
            raise PromptError(f"unknown builtin prompt set {name!r}; choose one of "
                              f"{', '.join(BUILTIN_PREFIX + n for n in builtin_prompt_sets())}.")
        return _checked(_parse_lines(path.read_text(encoding="utf-8")), source)
    if source.startswith(DATASET_PREFIX):
        return list(DatasetPrompts(source))
    path = _existing_file(source)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PromptError(f"prompt file {source} is not UTF-8 text; save it as UTF-8 with one prompt per line.") \
            from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PromptError(f"prompt file {source} is not valid JSON ({exc}); it must be a list of strings.") \
                from None
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise PromptError(f"prompt file {source} must hold a JSON list of strings.")
        return _checked([p.strip() for p in data if p.strip()], source)
    return _checked(_parse_lines(text), source)


def _existing_file(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.is_file():
        raise PromptError(f"prompt file {source} does not exist; pass a .txt file with one prompt per line, a "
                          f".json list, hf:DATASET, or builtin:animals.")
    return path


def save_typed_prompts(text: str, folder: str | os.PathLike) -> str | None:
    """Prompts typed one per line (a text box, a node's text field) saved as `folder/prompts/prompts-<hash>.txt`,
    named by content so that a run's config points at them and the same text always gives the same file; None when
    the text holds no prompt."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not lines:
        return None
    body = "\n".join(lines) + "\n"
    path = Path(folder) / "prompts" / f"prompts-{hashlib.sha256(body.encode()).hexdigest()[:12]}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body, encoding="utf-8")
    return str(path)


def _parse_lines(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _checked(prompts, source: str):
    if not len(prompts):
        raise PromptError(f"{source} holds no prompts; add at least one non-empty, non-comment line.")
    return prompts


def draw_prompts(prompts: Sequence[str], count: int, seed: int, epoch: int) -> list[str]:
    """The epoch's prompts: a uniform draw, without repeats when the set is large enough, reproducible from
    (seed, epoch) alone so that a resumed run draws exactly what an uninterrupted one would."""
    rng = np.random.default_rng([seed, epoch])
    index = rng.choice(len(prompts), size=count, replace=len(prompts) < count)
    return [prompts[i] for i in index]


def evaluation_sets(config, train_prompts: Sequence[str] | None = None) -> dict[str, list[str]]:
    """What every evaluation of a run with `config` samples: "seen" (its training prompts, loaded unless given) and,
    where it has held-out prompts, "unseen"; each at most eval_max_prompts (0: all) evenly spaced through its set,
    since sets are often sorted by subject."""
    train = open_prompts(config.prompts) if train_prompts is None else train_prompts
    sets = {"seen": _spread(train, config.eval_max_prompts)}
    if config.evaluation_prompts():
        sets["unseen"] = _spread(open_prompts(config.evaluation_prompts()), config.eval_max_prompts)
    return sets


def describe_evaluation(sets: dict[str, list[str]]) -> str:
    """Which prompts the evaluations sample, in one line."""
    seen = f"evaluation before and after training: {len(sets['seen'])} training prompts"
    if "unseen" in sets:
        return f"{seen} and {len(sets['unseen'])} prompts kept out of training"
    return f"{seen} only (no eval prompts given, so none kept out of training)"


def _spread(prompts: Sequence[str], count: int) -> list[str]:
    if not count or count >= len(prompts):
        return list(prompts)
    return [prompts[i * len(prompts) // count] for i in range(count)]
