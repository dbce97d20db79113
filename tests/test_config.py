"""Typed params: unknown keys, wrong types and bad values are rejected with the key named."""

from pathlib import Path

import pytest
import yaml

from fedcxr.config import ConfigError, Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repository_params_yaml_is_valid_and_matches_defaults():
    params = load_params(REPO / "params.yaml")
    assert params == Params(), "params.yaml and the schema defaults drifted apart"


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"partition": {"site_size": [1, 2]}}, "unknown key 'partition.site_size'"),
        ({"resise": {"size": 256}}, "unknown key 'resise'"),
        ({"resize": {"size": "512"}}, "'resize.size'"),
        ({"resize": {"size": 5.0}}, "'resize.size'"),
        ({"data": {"source": "kaggle"}}, "'data.source'"),
        ({"deid": {"on_violation": "ignore"}}, "'deid.on_violation'"),
        ({"partition": {"val_fraction": 1.5}}, "'partition.val_fraction'"),
        ({"partition": {"site_sizes": [100, -1]}}, "'partition.site_sizes'"),
        ({"ingest": {"max_bad_fraction": True}}, "'ingest.max_bad_fraction'"),
        ({"seed": "42"}, "'seed'"),
    ],
)
def test_bad_params_name_the_key(data, named):
    with pytest.raises(ConfigError) as info:
        parse_params(data, "params.yaml")
    assert named in str(info.value)
    assert "params.yaml" in str(info.value)


def test_lists_become_tuples_and_config_is_frozen():
    params = parse_params({"partition": {"site_sizes": [3, 4]}})
    assert params.partition.site_sizes == (3, 4)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        params.partition.test_size = 1


def test_load_params_reports_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_params(bad)
