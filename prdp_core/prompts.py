"""Prompt sources and the per-epoch prompt draw."""

from __future__ import annotations

import hashlib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import PromptError

BUILTIN_PREFIX = "builtin:"


def builtin_prompt_sets() -> list[str]:
    folder = resources.files(__package__) / "prompt_sets"
    return sorted(p.name[: -len(".txt")] for p in folder.iterdir() if p.name.endswith(".txt"))


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
    path = Path(source).expanduser()
    if not path.is_file():
        raise PromptError(f"prompt file {source} does not exist; pass a .txt file with one prompt per line, a "
                          f".json list, or builtin:animals.")
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


def _checked(prompts: list[str], source: str) -> list[str]:
    if not prompts:
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
    train = load_prompts(config.prompts) if train_prompts is None else train_prompts
    sets = {"seen": _spread(list(train), config.eval_max_prompts)}
    if config.evaluation_prompts():
        sets["unseen"] = _spread(load_prompts(config.evaluation_prompts()), config.eval_max_prompts)
    return sets


def describe_evaluation(sets: dict[str, list[str]]) -> str:
    """Which prompts the evaluations sample, in one line."""
    seen = f"evaluation before and after training: {len(sets['seen'])} training prompts"
    if "unseen" in sets:
        return f"{seen} and {len(sets['unseen'])} prompts kept out of training"
    return f"{seen} only (no eval prompts given, so none kept out of training)"


def _spread(prompts: list[str], count: int) -> list[str]:
    if not count or count >= len(prompts):
        return list(prompts)
    return [prompts[i * len(prompts) // count] for i in range(count)]
