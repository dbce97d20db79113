"""The cost planner: the projection's arithmetic, and the command a team runs before starting."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedcxr.cli import app
from fedcxr.plancost import Rates, Workload, duration, project

WORK = Workload(
    n_images=112_120,
    test_size=10_120,
    val_fraction=0.1,
    image_size=512,
    stored_size=512,
    rounds=20,
    local_epochs=2,
    epochs=40,
    tasks=2,
    seeds=3,
    dp=False,
)


def test_the_projection_counts_every_configuration_task_and_seed() -> None:
    rates = Rates(decode_images_per_s=100.0, train_images_per_s=500.0)
    parts = {p.name: p for p in project(WORK, rates)}
    n_train = round(102_000 * 0.9)
    assert WORK.n_train == n_train
    runs = 2 * 3
    assert parts["train federated"].seconds == pytest.approx(runs * 20 * 2 * n_train / 500)
    assert parts["train single node"].seconds == pytest.approx(runs * 40 * n_train / 500)
    assert parts["ingest + deid + resize"].seconds == pytest.approx(2 * 112_120 / 100)
    assert parts["ingest + deid + resize"].disk_bytes == 112_120 * 512 * 512
    assert "train federated (DP)" not in parts
    with_dp = {p.name for p in project(WORK.__class__(**{**WORK.__dict__, "dp": True}), rates)}
    assert "train federated (DP)" in with_dp
    with pytest.raises(ValueError, match="positive measured rates"):
        project(WORK, Rates(0.0, 1.0))


def test_durations_read_in_the_unit_that_fits() -> None:
    assert duration(42) == "42 s"
    assert duration(600) == "10 min"
    assert duration(5 * 3600) == "5.0 h"
    assert duration(3 * 86400) == "3.0 days"


def test_plan_cost_measures_this_machine_and_prints_the_table(tmp_path) -> None:
    result = CliRunner().invoke(
        app,
        ["plan-cost", "--train-rate", "250", "--rounds", "20", "--params", str(tmp_path / "none")],
    )
    assert result.exit_code == 0, result.output
    assert "112,120 images" in result.output and "250.0 training images/s" in result.output
    assert "train federated" in result.output and "20 rounds" in result.output
    assert "total" in result.output and "GB" in result.output
