"""Shared plumbing for the thin DVC stage scripts: params, deterministic JSON, clean failures."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from fedcxr.config import ConfigError, Params, load_params


def write_json(path: str | Path, data: Any) -> None:
    """Sorted keys, fixed indentation, trailing newline, atomic replace: same data, same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_stage(name: str, body: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Load params.yaml, run the stage body, turn expected errors into one clear message."""
    try:
        params = load_params(params_path)
        body(params)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"\n[{name}] failed: {exc}", file=sys.stderr)
        sys.exit(1)


def resolved(*sections: BaseModel) -> dict[str, Any]:
    """The resolved configuration to save beside an output (speed-only keys left out)."""
    out: dict[str, Any] = {}
    for section in sections:
        out.update(section.model_dump(mode="json", exclude={"workers"}))
    return out
