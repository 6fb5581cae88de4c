"""Writes docs/config.md, the reference of every TrainConfig setting, from the config's own field metadata (the
same help texts, defaults, choices and bounds the CLI, the tab and the nodes show).

    python tools/config_doc.py > docs/config.md

tests/test_docs.py fails when the page and the config disagree."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prdp_core.cli import build_parser  # noqa: E402
from prdp_core.config import field_specs  # noqa: E402

GROUPS = {"model": "What to train on", "reward": "Rewards", "objective": "The objective", "loop": "The online loop",
          "sampler": "The sampler", "lora": "The LoRA", "optimizer": "The optimiser",
          "eval": "Evaluation", "run": "The run", "memory": "Memory"}


def cli_flags() -> dict[str, str]:
    """Each setting's flag of `prdp train`, as its parser has it (the mix's two settings take repeatable flags)."""
    train = next(action for action in build_parser()._subparsers._group_actions[0].choices.values()
                 if action.prog.endswith(" train"))
    flags = {action.dest: action.option_strings[0] + (f" {action.metavar}" if action.metavar else "")
             for action in train._actions if action.option_strings}
    return {**flags, "rewards": flags["reward"], "reward_options": flags["reward_option"]}


def _value(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def _bounds(spec) -> str:
    if spec.choices:
        return " / ".join(spec.choices)
    low = "> 0" if spec.positive else f">= {spec.minimum:g}" if spec.minimum is not None else ""
    high = f"<= {spec.maximum:g}" if spec.maximum is not None else ""
    return ", ".join(part for part in (low, high) if part)


def config_markdown() -> str:
    lines = ["# Settings", "",
             "Every setting of a run, generated from `TrainConfig` by `tools/config_doc.py`. The same names are the "
             "keys of a TOML/JSON config file, the CLI's flags (`prdp train --NAME`, underscores as dashes), the "
             "tab's widgets and the ComfyUI nodes' inputs. Why the defaults are what they are: "
             "[algorithm.md](algorithm.md#settings-in-depth).", ""]
    specs, flags = field_specs(), cli_flags()
    for group, title in GROUPS.items():
        lines += [f"## {title}", "", "| setting | CLI | default | allowed | what it does |", "|---|---|---|---|---|"]
        for spec in (s for s in specs if s.group == group):
            lines.append(f"| `{spec.name}` | `{flags[spec.name]}` | `{_value(spec.default)}` | {_bounds(spec)} | "
                         f"{spec.help.replace('|', '/')} |")
        lines.append("")
    assert {s.group for s in specs} <= set(GROUPS), "a config group without a section here"
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(config_markdown())
