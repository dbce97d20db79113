"""Checkpoints round-trip exactly, are written atomically and refuse damaged files."""

import pytest
import torch

from fedcxr.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


def test_round_trip_and_overwrite(tmp_path):
    path = tmp_path / "ckpt" / "global.safetensors"
    state = {"w": torch.randn(3, 4), "n": torch.tensor(5)}
    save_checkpoint(path, state, 1, {"strategy": "fedavg", "epsilons": {"site-a": [0.1]}})
    save_checkpoint(path, {k: v + 1 for k, v in state.items()}, 2, {"strategy": "fedavg"})
    ckpt = load_checkpoint(path)
    assert ckpt.round == 2 and ckpt.meta == {"strategy": "fedavg"}
    assert torch.equal(ckpt.state["w"], state["w"] + 1)
    assert [p.name for p in path.parent.iterdir()] == ["global.safetensors"]  # no temp left


def test_damaged_checkpoint_is_refused(tmp_path):
    path = tmp_path / "global.safetensors"
    save_checkpoint(path, {"w": torch.ones(100)}, 3, {})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="not a fedcxr checkpoint"):
        load_checkpoint(path)
