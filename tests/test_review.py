"""The CI review: AUROC changes marked against the noise, the workflow, scripts/review.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvcrepo import REPO, commit_all, pipeline_copy, tiny_params
from typer.testing import CliRunner

from fedcxr.cli import app
from fedcxr.review import (
    BEYOND,
    NA,
    WITHIN,
    Change,
    auroc_changes,
    changed_plots,
    render_markdown,
)

SCRIPT = REPO / "scripts" / "review.sh"
WORKFLOW = REPO / ".github" / "workflows" / "review.yml"


def _entry(auroc: float | None, lo: float | None = None, hi: float | None = None) -> dict:
    entry: dict = {"auroc_macro": auroc, "auroc_macro_std": 0.0, "training": {"converged": True}}
    if lo is not None:
        entry["auroc_macro_lo"] = lo
    if hi is not None:
        entry["auroc_macro_hi"] = hi
    return entry


def _by_name(changes: list[Change]) -> dict[str, Change]:
    return {f"{c.config}/{c.task}": c for c in changes}


# ---------------------------------------------------------------------------
# the pure module
# ---------------------------------------------------------------------------


def test_changes_within_and_beyond_noise():
    base = {
        "federated": {"multilabel": _entry(0.70, 0.66, 0.74), "pneumonia": _entry(0.80, 0.7, 0.9)},
        "single_node": {"multilabel": _entry(0.75, 0.7, 0.8)},
        "comparisons": {"multilabel": {"federated_vs_single_node": {"auroc_diff": -0.05}}},
    }
    new = {
        # +0.02 against a half-width of 0.03: within
        "federated": {"multilabel": _entry(0.72, 0.69, 0.75), "pneumonia": _entry(0.65, 0.6, 0.8)},
        # exactly the half-width (0.05) is not larger than it: within
        "single_node": {"multilabel": _entry(0.80, 0.75, 0.85)},
        "comparisons": {"multilabel": {"federated_vs_single_node": {"auroc_diff": -0.08}}},
    }
    changes = auroc_changes(base, new)
    got = _by_name(changes)
    assert list(got) == ["federated/multilabel", "single_node/multilabel", "federated/pneumonia"]
    fed = got["federated/multilabel"]
    assert fed.delta == pytest.approx(0.02) and fed.half_width == pytest.approx(0.03)
    assert fed.verdict == WITHIN and fed.reason == ""
    assert got["single_node/multilabel"].verdict == WITHIN
    # -0.15 against the new run's half-width 0.10: beyond (the sign does not matter)
    pneu = got["federated/pneumonia"]
    assert pneu.delta == pytest.approx(-0.15) and pneu.half_width == pytest.approx(0.10)
    assert pneu.verdict == BEYOND
    assert Change("federated", "pneumonia", 0.80, 0.69, 0.10).verdict == BEYOND
    assert Change("federated", "pneumonia", 0.80, 0.80, 0.0).verdict == WITHIN


def test_the_new_runs_interval_is_the_noise():
    """The half-width is the change's own interval, not the baseline's."""
    base = {"federated": {"multilabel": _entry(0.70, 0.50, 0.90)}}  # wide
    new = {"federated": {"multilabel": _entry(0.75, 0.74, 0.76)}}  # narrow
    (change,) = auroc_changes(base, new)
    assert change.half_width == pytest.approx(0.01) and change.verdict == BEYOND


def test_configs_missing_on_either_side_are_na():
    base = {"local_site-a": {"multilabel": _entry(0.6, 0.5, 0.7)}}
    new = {"federated_dp": {"multilabel": _entry(0.65, 0.6, 0.7)}}
    got = _by_name(auroc_changes(base, new))
    added, removed = got["federated_dp/multilabel"], got["local_site-a/multilabel"]
    assert added.verdict == NA and added.reason == "not in baseline" and added.delta is None
    assert added.new == 0.65 and added.half_width == pytest.approx(0.05)
    assert removed.verdict == NA and removed.reason == "not in this change"
    assert removed.base == 0.6 and removed.half_width is None


def test_missing_or_null_interval_is_na():
    base = {"federated": {"multilabel": _entry(0.7, 0.6, 0.8), "pneumonia": _entry(0.7, 0.6, 0.8)}}
    new = {
        "federated": {
            "multilabel": _entry(0.9),  # no _lo/_hi keys at all
            "pneumonia": {**_entry(0.9, 0.8, 1.0), "auroc_macro_hi": None},  # NaN -> null
        }
    }
    for change in auroc_changes(base, new):
        assert change.delta == pytest.approx(0.2)
        assert change.verdict == NA and change.reason == "no confidence interval"


def test_null_auroc_is_na_and_non_entries_are_ignored():
    base = {"federated": {"pneumonia": _entry(None, None, None)}, "note": "text", "n": 3}
    new = {"federated": {"pneumonia": _entry(0.7, 0.6, 0.8)}, "comparisons": {}}
    (change,) = auroc_changes(base, new)
    assert change.verdict == NA and change.reason == "not in baseline"


def test_render_markdown_has_every_part():
    changes = auroc_changes(
        {"federated": {"multilabel": _entry(0.70, 0.66, 0.74)}},
        {
            "federated": {"multilabel": _entry(0.80, 0.78, 0.82)},
            "centralized": {"multilabel": _entry(0.8)},
        },
    )
    text = render_markdown(
        changes,
        "origin/main",
        "| Path | Metric | HEAD | workspace | Change |\n|---|---|---|---|---|\n"
        "| x | y | 1 | 2 | 1 |",
        ["ROC (federated.csv)"],
        "dvc_plots/index.html",
    )
    assert text.startswith("## Review against `origin/main`")
    assert "1 AUROC change(s) beyond noise:** federated/multilabel (+0.1000)" in text
    assert (
        "| Task | Configuration | Baseline | This change | Δ AUROC | 95% CI ± | Verdict |" in text
    )
    assert "| multilabel | federated | 0.7000 | 0.8000 | +0.1000 | 0.0200 | **beyond noise** |" in (
        text
    )
    assert "| multilabel | centralized | – | 0.8000 | – | – | n/a (not in baseline) |" in text
    assert "### `dvc metrics diff origin/main`" in text and "| x | y | 1 | 2 | 1 |" in text
    assert "- ROC (federated.csv)" in text
    assert "`dvc_plots/index.html`" in text

    # dvc prints the table's header alone when nothing changed
    quiet = render_markdown([], "main", "| Path | Metric |\n|---|---|\n")
    assert "No AUROC change is beyond noise." in quiet and "<details>" not in quiet
    assert "_No metric changed._" in quiet and "_No plot changed since `main`._" in quiet


def _vega(revisions: dict[str, list[dict]]) -> dict:
    values = [{**row, "rev": rev} for rev, rows in revisions.items() for row in rows]
    return {"type": "vega", "revisions": list(revisions), "content": {"data": {"values": values}}}


def test_changed_plots_from_dvc_plots_diff_json():
    roc = {"fpr": "0.0", "tpr": "0.5"}
    same = [{**roc, "filename": "single_node.csv"}]
    plots = {
        "errors": [{"source": "reports/plots/roc/pneumonia/federated.csv"}],
        "data": {
            "ROC": [
                _vega(
                    {
                        "workspace": [*same, {**roc, "tpr": "0.6", "filename": "federated.csv"}],
                        "main": [*same, {**roc, "filename": "federated.csv"}],
                    }
                )
            ],
            "live/train_loss.tsv": [_vega({"workspace": [{"step": "0", "loss": "0.7"}]})],
            "live/val_auroc.tsv": [
                _vega({"workspace": [{"step": "0", "a": "1"}], "main": [{"step": "0", "a": "1"}]})
            ],
            "ROC (pneumonia)": [],  # no data in either revision
        },
    }
    assert changed_plots(plots) == ["ROC (federated.csv)", "live/train_loss.tsv"]
    assert changed_plots({}) == []


def test_review_command(tmp_path: Path):
    base, new, diff = tmp_path / "base.json", tmp_path / "new.json", tmp_path / "diff.md"
    base.write_text(json.dumps({"federated": {"multilabel": _entry(0.7, 0.6, 0.8)}}))
    new.write_text(json.dumps({"federated": {"multilabel": _entry(0.71, 0.6, 0.8)}}))
    diff.write_text("| Path | Metric |\n")
    runner = CliRunner()
    result = runner.invoke(
        app, ["review", str(base), str(new), "--base-ref", "v1", "--metrics-diff", str(diff)]
    )
    assert result.exit_code == 0, result.output
    assert "| multilabel | federated | 0.7000 | 0.7100 | +0.0100 | 0.1000 | within noise |" in (
        result.output
    )
    out = tmp_path / "review.md"
    result = runner.invoke(app, ["review", str(base), str(new), "--out", str(out)])
    assert result.exit_code == 0 and "## Review against `main`" in out.read_text()

    missing = runner.invoke(
        app, ["review", str(tmp_path / "nope.json"), str(new)], env={"COLUMNS": "400"}
    )
    # Rich wraps the error panel at the terminal's width: read it as one line of words.
    text = " ".join(missing.output.replace("│", " ").split())
    assert missing.exit_code != 0 and "baseline metrics" in text
    assert "nope.json does not exist" in text


# ---------------------------------------------------------------------------
# the workflow and the script
# ---------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def test_workflow_validates_against_the_github_schema():
    result = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    flow = yaml.safe_load(WORKFLOW.read_text())
    assert "pull_request" in flow[True]  # YAML 1.1 reads the key `on` as True
    steps = flow["jobs"]["review"]["steps"]
    uses = {step.get("uses", "").split("@")[0]: step for step in steps}
    assert uses["actions/checkout"]["with"]["fetch-depth"] == 0
    assert uses["actions/setup-python"]["with"]["python-version"] == "3.11"
    runs = [step.get("run", "") for step in steps]
    assert "bash scripts/setup.sh" in runs
    assert any(r.startswith("bash scripts/review.sh --base") for r in runs)
    assert uses["actions/upload-artifact"]["with"]["path"] == "dvc_plots"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GITHUB_STEP_SUMMARY",)}
    env.pop("FEDCXR_DEID_SECRET", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=_env(**env), capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_review_sh_help_and_errors(tmp_path: Path):
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for word in ("--base REF", "--no-repro", "--out FILE", "GITHUB_STEP_SUMMARY", "within noise"):
        assert word in result.stdout

    repo = commit_all(pipeline_copy(tmp_path / "repo", tiny_params()))
    for args, message in (
        (["--base", "nosuchref"], "baseline ref nosuchref not found"),
        (["--base", "HEAD"], "baseline ref HEAD has no reports/metrics.json"),
        (["--bogus"], "unknown argument '--bogus'"),
    ):
        result = subprocess.run(
            ["bash", str(SCRIPT), "--no-repro", *args],
            cwd=repo,
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert result.returncode != 0 and message in result.stderr, result.stderr

    # The baseline has metrics, the work tree none (and --no-repro): say which file is missing.
    (repo / "reports").mkdir()
    (repo / "reports" / "metrics.json").write_text("{}")
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "metrics"], repo)
    (repo / "reports" / "metrics.json").unlink()
    result = subprocess.run(
        ["bash", str(SCRIPT), "--no-repro", "--base", "HEAD"],
        cwd=repo,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "reports/metrics.json not found in the work tree" in result.stderr


@pytest.mark.slow
def test_review_sh_on_a_tiny_study(tmp_path: Path):
    """A committed baseline of the tiny study; on a branch, one more local epoch per round;
    scripts/review.sh reruns the pipeline and writes the review into the job summary."""
    params = tiny_params(n_images=240)  # the smallest sample the whole study runs on
    params["study"]["tasks"] = ["multilabel"]  # 240 images leave no pneumonia positive to test
    params["train"]["epochs"] = 2
    params["fl"]["rounds"] = 2
    params["evaluate"]["n_boot"] = 100  # the least config.py accepts
    repo = commit_all(pipeline_copy(tmp_path / "repo", params))
    _run(["dvc", "repro"], repo)
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", "baseline"], repo)
    _run(["git", "tag", "baseline"], repo)
    _run(["git", "checkout", "-qb", "change"], repo)
    params["fl"]["local_epochs"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    result = _run(
        ["bash", str(SCRIPT), "--base", "baseline"], repo, GITHUB_STEP_SUMMARY=str(summary)
    )
    assert result.stdout == ""  # everything went into the summary
    assert "Running stage 'train_federated@multilabel-42'" in result.stderr  # it reran
    assert "Running stage 'train_single_node@multilabel-42'" not in result.stderr
    text = summary.read_text()
    print(text)
    assert text.startswith("earlier step\n## Review against `baseline`")  # appended
    # the metrics diff table, as dvc prints it
    assert "| Path" in text and "| Metric" in text and "federated.multilabel.auroc_macro" in text
    # the noise column: federated changed, the configurations it does not touch did not
    rows = {
        line.split(" | ")[1]: line
        for line in text.splitlines()
        if line.startswith("| multilabel | ")
    }
    assert set(rows) >= {"federated", "single_node", "centralized", "local_site-a"}
    assert "| +0.0000 |" in rows["single_node"] and "within noise" in rows["single_node"]
    assert "noise" in rows["federated"] and "| +0.0000 |" not in rows["federated"]
    plots = text.split("### Plots")[1]
    assert "ROC (14 findings, micro-average) (federated.csv)" in plots
    assert "single_node" not in plots  # unchanged plots are not listed
    assert (repo / "dvc_plots" / "index.html").is_file()
