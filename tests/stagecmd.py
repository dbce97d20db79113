"""The command dvc.yaml runs for a stage, for tests that run stage scripts in a scratch folder."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
_ITEM = re.compile(r"\$\{item\.(\w+)\}")


def stage_argv(name: str, **item: object) -> list[str]:
    """[python, <repo>/stages/<script>.py, options...] as the `cmd` of stage `name` in dvc.yaml
    gives them; a matrix stage's ${item.<key>} values come from `item`."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    if name not in stages:
        raise KeyError(f"dvc.yaml has no stage {name!r}; stages: {sorted(stages)}")

    def value(match: re.Match[str]) -> str:
        if match.group(1) not in item:
            raise KeyError(f"stage {name!r} needs item {match.group(1)!r}: pass it to stage_argv")
        return str(item[match.group(1)])

    words = shlex.split(_ITEM.sub(value, stages[name]["cmd"]))
    if words[:1] != ["python"] or "${" in " ".join(words):
        raise ValueError(f"stage {name!r}: cannot run {stages[name]['cmd']!r} here")
    return [sys.executable, str(REPO / words[1]), *words[2:]]
