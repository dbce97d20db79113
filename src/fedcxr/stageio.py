"""Shared plumbing for the thin DVC stage scripts: params, deterministic JSON, clean failures."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel

from fedcxr.config import ConfigError, Params, load_params

FILE_MODE = 0o644  # what a new output file gets (mkstemp alone would give 0o600)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary file beside `path` to write the new content to; renamed over `path`.

    On leaving the block the temporary file is fsynced and renamed over `path` (os.replace),
    then the folder is fsynced; on an error it is removed and `path` is left as it was. The
    new content is always a new file (a new inode): a hard link or symlink into the DVC cache
    that `path` may be after `dvc checkout` is replaced, never written through, and a reader
    sees the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (see atomic_path)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically (see atomic_path)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def unshare(path: str | Path) -> bool:
    """Make `path` a file of its own before it is changed in place (appended to).

    A symlink, or a file with other hard links -- a DVC cache object after `dvc checkout` with
    cache.type hardlink or symlink -- is replaced by a private copy (atomic_path), so an append
    reaches this file only. True when a copy was made; a missing path is left alone.
    """
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise FileNotFoundError(f"{path} is a symlink to a missing file ({os.readlink(path)})")
    elif not path.exists() or path.stat().st_nlink <= 1:
        return False
    with atomic_path(path) as tmp:
        shutil.copyfile(path, tmp)
    return True


def write_json(path: str | Path, data: Any) -> None:
    """Sorted keys, fixed indentation, trailing newline, atomic replace: same data, same bytes."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def run_stage(name: str, body: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Load params.yaml, run the stage body, turn expected errors into one clear message."""
    try:
        params = load_params(params_path)
        body(params)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"\n[{name}] failed: {exc}", file=sys.stderr)
        sys.exit(1)


def stage_cli(name: str, body: Callable[..., None], params_path: str = "params.yaml") -> None:
    """Run a stage script's `body(params, **options)` as a typer command.

    The options (paths and matrix entries) come from the `cmd` line in dvc.yaml; typer builds
    `--help` from the body's signature and docstring, leaving out its first parameter, which
    receives the loaded params.yaml. Expected errors end as one clear message (exit code 1).
    """
    signature = inspect.signature(body)
    options = list(signature.parameters.values())[1:]

    @functools.wraps(body)
    def command(**kwargs: Any) -> None:
        run_stage(name, lambda params: body(params, **kwargs), params_path)

    command.__signature__ = signature.replace(parameters=options)  # type: ignore[attr-defined]
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command(name=name)(command)
    app(prog_name=f"stages/{name}.py")


def resolved(*sections: BaseModel) -> dict[str, Any]:
    """The resolved configuration to save beside an output (speed-only keys left out)."""
    out: dict[str, Any] = {}
    for section in sections:
        out.update(section.model_dump(mode="json", exclude={"workers"}))
    return out
