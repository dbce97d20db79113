"""Typed params: unknown keys, wrong types and bad values are rejected with the key named."""

from pathlib import Path
from typing import get_args

import pytest
import yaml
from typer.testing import CliRunner

from fedcxr.cli import app
from fedcxr.config import (
    REGISTRIES,
    ConfigError,
    EvaluateConfig,
    Params,
    Task,
    load_params,
    parse_params,
    resolve_world_size,
)
from fedcxr.stageio import run_stage

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


# --- names a registry resolves are checked on load ----------------------------------------


def test_every_registry_holds_exactly_the_names_params_are_checked_against():
    from fedcxr.evaluation.stats import THRESHOLD_RULES
    from fedcxr.federation.strategies import STRATEGIES
    from fedcxr.models import MODELS, NUM_CLASSES
    from fedcxr.partition import PARTITIONERS
    from fedcxr.train.data import TASKS

    live = {"model.arch": MODELS, "fl.strategy": STRATEGIES, "partition.strategy": PARTITIONERS}
    assert set(live) == set(REGISTRIES)
    for key, registry in live.items():
        assert set(registry) == set(REGISTRIES[key][1]), key
        section, field = key.split(".")
        for name in registry:  # every registered name is accepted
            assert getattr(getattr(parse_params({section: {field: name}}), section), field) == name
    # Names fixed by a Literal in the schema match the code that resolves them.
    rules = EvaluateConfig.model_fields["threshold_rule"].annotation
    assert set(get_args(rules)) == set(THRESHOLD_RULES)
    assert set(get_args(Task)) == set(TASKS) == set(NUM_CLASSES)


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("model", "arch", "vgg16"),
        ("fl", "strategy", "fedsgd"),
        ("partition", "strategy", "demografic"),
    ],
)
def test_unknown_registry_names_are_refused_on_load(section, field, value):
    with pytest.raises(ConfigError) as info:
        parse_params({section: {field: value}}, "params.yaml")
    message = str(info.value)
    assert f"'{section}.{field}'" in message and repr(value) in message and "params.yaml" in message
    for name in REGISTRIES[f"{section}.{field}"][1]:
        assert repr(name) in message
    assert "Value error" not in message  # pydantic's prefix is dropped


def test_check_params_refuses_all_three_bad_names_at_once(tmp_path):
    path = tmp_path / "params.yaml"
    bad = {"model": {"arch": "vgg16"}, "fl": {"strategy": "fedsgd"}}
    path.write_text(yaml.safe_dump(bad | {"partition": {"strategy": "demografic"}}))
    result = CliRunner().invoke(app, ["check-params", str(path)])
    assert result.exit_code == 2
    for text in ("'model.arch'", "'vgg16'", "'fl.strategy'", "'fedsgd'", "'demografic'"):
        assert text in result.output
    assert "Traceback" not in result.output


# --- YAML syntax errors: one line, file:line:column ----------------------------------------


TAB_YAML = "seed: 42\npartition:\n\tstrategy: iid\n"


def test_yaml_tab_is_one_line_with_file_line_and_column(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(TAB_YAML)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    assert str(info.value) == (
        f"{path}:3:1: invalid YAML: found character '\\t' that cannot start any token "
        "(a tab: YAML indents with spaces)"
    )


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        (
            "seed: 1\ntrain:\n  lr: 0.1\n  lr: 0.2\n",
            ":4:3:",
            "duplicate key 'lr' (first given on line 3)",
        ),
        ("train:\n  seeds: [1, 2\nseed: 3\n", ":3:5:", "expected ',' or ']'"),
    ],
)
def test_other_yaml_errors_name_line_and_column(tmp_path, text, where, what):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}{where} invalid YAML")
    assert what in message


def test_check_params_and_stages_print_a_yaml_error_as_one_line(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text(TAB_YAML)
    result = CliRunner().invoke(app, ["check-params", str(path)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [str(load_error(path))]

    def body(params):  # pragma: no cover - must not run
        raise AssertionError("the stage body ran despite a broken params.yaml")

    with pytest.raises(SystemExit) as info:
        run_stage("partition", body, str(path))
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [f"[partition] failed: {load_error(path)}"]


def load_error(path: Path) -> ConfigError:
    try:
        load_params(path)
    except ConfigError as exc:
        return exc
    raise AssertionError(f"{path} loaded")


# --- train.ddp_world_size: auto -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "gpus", "expected"),
    [("auto", 0, 2), ("auto", 1, 1), ("auto", 8, 8), (1, 0, 1), (4, 0, 4), (1, 1, 1), (2, 2, 2)],
)
def test_world_size_resolves_per_machine(value, gpus, expected):
    assert resolve_world_size(value, gpus) == expected


def test_world_size_above_the_gpu_count_is_refused_naming_key_and_count():
    with pytest.raises(ConfigError) as info:
        resolve_world_size(2, 1)
    message = str(info.value)
    assert "'train.ddp_world_size'" in message and "1 CUDA GPU" in message
    assert "found 2" in message and "auto" in message
    with pytest.raises(ConfigError, match="at most 4"):
        resolve_world_size(8, 4)


def test_world_size_param_is_auto_by_default_and_checked():
    assert Params().train.ddp_world_size == "auto"
    assert parse_params({"train": {"ddp_world_size": 4}}).train.ddp_world_size == 4
    for bad in ("all", 0, -1, 2.0, True, "2"):
        with pytest.raises(ConfigError, match=r"'train.ddp_world_size': expected 'auto' or"):
            parse_params({"train": {"ddp_world_size": bad}})
    with pytest.raises(ConfigError, match=r"size.: expected a divisor of train.batch_size=32"):
        parse_params({"train": {"ddp_world_size": 3}})


@pytest.mark.parametrize(
    ("gpus", "world", "code", "text"),
    [
        (0, "auto", 0, "2 process(es)"),
        (1, "auto", 0, "1 process(es)"),
        (1, 2, 2, "'train.ddp_world_size': expected at most 1"),
        (4, 2, 0, "2 process(es)"),
    ],
)
def test_check_params_checks_the_world_size_against_this_machine(
    tmp_path, monkeypatch, gpus, world, code, text
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"ddp_world_size": world}}))
    result = CliRunner().invoke(app, ["check-params", str(path)])
    assert result.exit_code == code, result.output
    assert text in result.output
    if code:
        assert str(path) in result.output


def test_the_stage_resolves_the_world_size_with_this_machines_gpu_count(monkeypatch):
    import torch

    from fedcxr.train.ddp import cuda_gpu_count, machine_world_size

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cuda_gpu_count() == 1 and machine_world_size("auto") == 1
    with pytest.raises(ConfigError, match=r"at most 1 .*found 2"):
        machine_world_size(2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cuda_gpu_count() == 0 and machine_world_size("auto") == 2 == machine_world_size(2)


# --- data.nih_dir: the folder DVC tracks ----------------------------------------------------


def test_nih_dir_is_the_folder_ingest_reads_and_dvc_tracks():
    assert Params().data.nih_dir == "data/raw/synthetic"
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name in ("ingest", "resize"):
        assert "${data.nih_dir}" in stages[name]["deps"], name
        assert not any("${data.source}" in dep for dep in stages[name]["deps"]), name
    for folder in ("/data/ChestX-ray14", "../nih", "data/raw/nih"):
        params = parse_params({"data": {"source": "nih", "nih_dir": folder}})
        assert params.data.nih_dir == folder


@pytest.mark.parametrize(
    ("data", "text"),
    [
        ({"source": "nih"}, "-S data.nih_dir=data/raw/nih"),
        ({"source": "nih", "nih_dir": "./data/raw/synthetic/"}, "-S data.nih_dir=data/raw/nih"),
        ({"source": "synthetic", "nih_dir": "/data/cxr"}, "set data.nih_dir: data/raw/synthetic"),
        ({"source": "nih", "nih_dir": "~/cxr"}, "DVC expands no ~"),
    ],
)
def test_nih_dir_that_contradicts_the_source_is_refused(data, text):
    with pytest.raises(ConfigError) as info:
        parse_params({"data": data}, "params.yaml")
    assert "'data.nih_dir'" in str(info.value) and text in str(info.value)


def test_check_params_refuses_an_nih_dir_that_does_not_exist(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "params.yaml"
    for folder in ("cxr14", str(tmp_path / "cxr14")):  # relative: beside params.yaml, as DVC
        path.write_text(yaml.safe_dump({"data": {"source": "nih", "nih_dir": folder}}))
        result = CliRunner().invoke(app, ["check-params", str(path)])
        assert result.exit_code == 2
        assert "'data.nih_dir'" in result.output and str(tmp_path / "cxr14") in result.output
    (tmp_path / "cxr14").mkdir()
    result = CliRunner().invoke(app, ["check-params", str(path)])
    assert result.exit_code == 0, result.output


# --- partition.fit ---------------------------------------------------------------------------


def test_partition_fit_values():
    assert Params().partition.fit == "auto"
    assert parse_params({"partition": {"fit": "exact"}}).partition.fit == "exact"
    with pytest.raises(ConfigError, match=r"'partition\.fit'"):
        parse_params({"partition": {"fit": "shrink"}})


def test_loader_workers_are_auto_by_default_or_a_count():
    assert Params().train.num_workers == "auto"
    assert parse_params({"train": {"num_workers": 3}}).train.num_workers == 3
    for bad in (-1, "many", 1.5):
        with pytest.raises(ConfigError, match=r"train\.num_workers.*'auto' or a number"):
            parse_params({"train": {"num_workers": bad}})


def test_compile_is_refused_under_dp_naming_both_keys():
    assert parse_params({"train": {"compile": True}}).train.compile is True
    with pytest.raises(ConfigError, match=r"train\.compile: false with dp\.enabled: true"):
        parse_params({"train": {"compile": True}, "dp": {"enabled": True}})


def test_train_lr_auto_resolves_per_architecture_and_explicit_rates_stay() -> None:
    from fedcxr.config import ARCH_LR

    assert Params().train.lr == ARCH_LR["smallcnn"] == 1e-3
    for arch in ("resnet50", "densenet121"):
        assert Params(model={"arch": arch}).train.lr == ARCH_LR[arch] == 1e-4
    assert Params(train={"lr": 3e-4}).train.lr == 3e-4
    with pytest.raises(ValueError, match="learning rate"):
        Params(train={"lr": "fast"})
    with pytest.raises(ValueError, match="learning rate"):
        Params(train={"lr": -1.0})
