"""User scorers given as `module:function` or `path/to/file.py:function`.

The function receives a list of PIL images and a list of prompts and returns one number per image (list, numpy
array or tensor)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ..errors import RewardError
from .base import Reward


class CallableReward(Reward):
    def __init__(self, name: str, function, device="cpu"):
        super().__init__(device=device)
        self.name, self.function = name, function

    @classmethod
    def from_spec(cls, spec: str, device="cpu") -> "CallableReward":
        target, _, attribute = spec.rpartition(":")
        if not target or not attribute:
            raise RewardError(f"custom reward {spec!r} must look like module:function or path/to/file.py:function.")
        module = _import_file(target) if target.endswith(".py") else _import_module(target)
        function = getattr(module, attribute, None)
        if not callable(function):
            raise RewardError(f"custom reward {spec!r}: {target} has no function {attribute!r}.")
        return cls(spec, function, device=device)

    def score_batch(self, images, prompts):
        return self.function(images, prompts)


def _import_file(target: str):
    path = Path(target).expanduser()
    if not path.is_file():
        raise RewardError(f"custom reward file {target} does not exist; check the path.")
    module_spec = importlib.util.spec_from_file_location(f"prdp_custom_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise RewardError(f"custom reward file {target} failed to import: {type(exc).__name__}: {exc}.") from exc
    return module


def _import_module(target: str):
    try:
        return importlib.import_module(target)
    except ImportError as exc:
        raise RewardError(f"custom reward module {target!r} cannot be imported ({exc}); install it or put it on "
                          f"PYTHONPATH.") from None
    except Exception as exc:
        raise RewardError(f"custom reward module {target!r} failed to import: {type(exc).__name__}: {exc}.") from exc
