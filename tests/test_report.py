"""Study report: every section in Markdown and self-contained HTML, numbers with CIs, rule-based
reading consistent with the p-values, graceful gaps, and Grad-CAM panels."""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedcxr.models import MODELS, build_model
from fedcxr.report import budgets, fmt, paper
from fedcxr.report.figures import forest_plot, forest_rows, learning_plot
from fedcxr.report.gradcam import (
    TARGET_LAYERS,
    gradcam_panel,
    model_inputs,
    panel_figure,
    target_layer,
)
from fedcxr.report.inputs import ReportPaths, RunContext, load_inputs
from fedcxr.report.reading import claim_sentence, judge
from fedcxr.report.render import SECTIONS, render_report
from fedcxr.report.tables import config_label, task_label

FIXTURE = Path(__file__).parent / "fixtures" / "report"
CONTEXT = RunContext(
    data_source="synthetic", arch="smallcnn", image_size=128, seeds=(1, 2, 3), local_epochs=1
)


def _section(text: str, heading: str, md: bool = True) -> str:
    """The text of one section (up to the next section heading)."""
    if md:
        start = text.index(f"## {heading}\n")
        end = text.find("\n## ", start + 1)
    else:
        start = text.index(f">{html.escape(heading)}</h2>")
        end = text.find("<h2", start + 1)
    return text[start : end if end != -1 else len(text)]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    shutil.copytree(FIXTURE, root, dirs_exist_ok=True)
    gradcam = root / "reports" / "figures" / "gradcam_pneumonia.png"
    gradcam.parent.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(gradcam)
    paths = ReportPaths().under(root)
    result = render_report(
        paths, root / "out" / "report.md", root / "out" / "report.html", context=CONTEXT
    )
    metrics = json.loads(paths.metrics.read_text())
    return result, result.markdown.read_text(), result.html.read_text(), metrics


def test_every_section_heading_is_in_markdown_and_html(rendered):
    _, md, page, _ = rendered
    for heading in SECTIONS:
        assert f"## {heading}\n" in md, heading
        assert f">{html.escape(heading)}</h2>" in page, heading


def test_html_is_self_contained_with_data_uri_images(rendered):
    result, _, page, _ = rendered
    assert 'src="http' not in page and 'href="http' not in page
    assert "<link" not in page and "<script" not in page and "url(" not in page
    sources = re.findall(r'<img[^>]*src="([^"]+)"', page)
    # 6 generated figures (forest, learning curves, ROC x2, per-round curves, epsilon) + the
    # Grad-CAM panel
    assert len(sources) == len(result.figures) + 1 == 7
    assert all(s.startswith("data:image/png;base64,") for s in sources)


def test_markdown_links_figures_that_exist(rendered):
    result, md, _, _ = rendered
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 7
    for link in links:
        assert (result.markdown.parent / link).is_file(), link


def _first_table(text: str, md: bool) -> int:
    return text.index("\n| ") if md else text.index("<table")


def test_forest_plot_is_the_first_figure_before_any_table(rendered):
    result, md, page, _ = rendered
    assert result.figures[0].name == "forest_auroc.png"
    first_link = re.search(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert first_link and first_link.group(1).endswith("forest_auroc.png")
    assert first_link.start() < _first_table(md, True)
    assert md.index("Test AUROC of every configuration") < md.index("## Reading the results")
    first_img = re.search(r'<img alt="([^"]*)"', page)
    assert first_img and first_img.group(1).startswith("Test AUROC of every configuration")
    assert first_img.start() < _first_table(page, False)


def _synthetic_metrics() -> dict:
    def m(value, lo=None, hi=None):
        out = {"auroc_macro": value, "n_test_images": 50, "n_test_patients": 20}
        return out | ({"auroc_macro_lo": lo, "auroc_macro_hi": hi} if lo is not None else {})

    return {
        "federated": {"multilabel": m(0.71, 0.66, 0.75), "pneumonia": m(0.64, 0.52, 0.77)},
        "centralized": {"multilabel": m(0.74, 0.70, 0.78)},
        "single_node": {"pneumonia": m(None)},  # not computed: no row
        "local_site-c": {"multilabel": m(0.60)},  # no CI: a point without a bar
        "local_site-a": {"multilabel": m(0.62, 0.55, 0.69), "pneumonia": m(0.58, 0.41, 0.74)},
        "comparisons": {},
    }


def test_forest_plot_rows_follow_the_report_order_and_omit_absent_configs(tmp_path):
    configs = {k: v for k, v in _synthetic_metrics().items() if k != "comparisons"}
    assert [r.config for r in forest_rows(configs, "multilabel")] == [
        "federated",
        "centralized",
        "local_site-a",
        "local_site-c",
    ]
    assert [r.config for r in forest_rows(configs, "pneumonia")] == ["federated", "local_site-a"]
    assert forest_rows(configs, "multilabel")[-1].lo is None
    fig = forest_plot(configs, ["multilabel", "pneumonia"])
    assert fig is not None and len(fig.axes) == 2
    ticks = [[t.get_text() for t in ax.get_yticklabels()] for ax in fig.axes]
    assert ticks[0] == [
        "Federated",
        "Centralized (multi-node)",
        "Site-local (site-a)",
        "Site-local (site-c)",
    ]
    assert ticks[1] == ["Federated", "Site-local (site-a)"]
    shown = " ".join(ticks[0] + ticks[1])
    assert "DP" not in shown and "Single node" not in shown and "site-b" not in shown
    lines = [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert "best pooled: Centralized (multi-node), 0.740" in lines
    assert forest_plot(configs, []) is None and forest_plot({}, ["multilabel"]) is None

    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(_synthetic_metrics()))
    result = render_report(
        ReportPaths().under(tmp_path), tmp_path / "r.md", tmp_path / "r.html", context=CONTEXT
    )
    forest = result.markdown.parent / "report_figures" / "forest_auroc.png"
    assert forest in result.figures
    with Image.open(forest) as png:
        assert png.format == "PNG" and png.width > png.height
    md, page = result.markdown.read_text(), result.html.read_text()
    assert md.index("forest_auroc.png") < _first_table(md, True)
    assert page.index('<img alt="Test AUROC') < _first_table(page, False)


def test_table1_shows_the_fixture_numbers_with_ci_seed_spread_and_paper(rendered):
    _, md, page, metrics = rendered
    fed = metrics["federated"]["multilabel"]
    assert fed["n_seeds"] > 1
    expected = (
        f"{fed['auroc_macro']:.3f} ± {fed['auroc_macro_std']:.3f} "
        f"({fed['auroc_macro_lo']:.3f}–{fed['auroc_macro_hi']:.3f})"
    )
    assert expected == "0.712 ± 0.004 (0.692–0.732)"
    pneu = metrics["federated"]["pneumonia"]
    single_seed = f"{pneu['auroc_macro']:.3f} ({pneu['auroc_macro_lo']:.3f}–"
    for text, is_md in ((md, True), (page, False)):
        table1 = _section(text, "Table 1 — Classification performance", is_md)
        if not is_md:  # the text a reader sees: cells hold spans that say where a line may wrap
            table1 = html.unescape(re.sub(r"<[^>]+>", "", table1))
        assert expected in table1
        table1b = table1[table1.index("Table 1b") :]
        assert single_seed in table1b and f"{pneu['auroc_macro']:.3f} ±" not in table1b
        assert "0.837 ± 0.006" in table1  # paper Table 1, Federated Multi-Node, AUC 83.7 ± 0.6
    table2 = _section(md, "Table 2 — Pneumonia sensitivity and specificity")
    assert "0.901 ± 0.006" in table2  # paper Table 2, Federated, Sens. 90.1 ± 0.6
    assert fmt.estimate(pneu, "sensitivity_pneumonia") in table2
    table3 = _section(md, "Table 3 — Training efficiency")
    assert "36.0" in table3 and "10–20 GB" in table3  # 36,035,760 bytes -> MB


def test_reading_matches_the_fixture_p_values(rendered):
    _, md, _, metrics = rendered
    reading = _section(md, "Reading the results")
    lines = [line for line in reading.splitlines() if line.startswith("- ")]
    checked = 0
    for task, comps in metrics["comparisons"].items():
        for key, comp in comps.items():
            other = key.removeprefix("federated_vs_")
            if other.startswith("local_"):
                continue
            label = "Multi-label" if task == "multilabel" else "Pneumonia"
            line = next(
                x
                for x in lines
                if x.startswith(f"- {label}") and f"Federated vs {config_label(other)}:" in x
            )
            if comp["delong_p"] < 0.05:
                assert "larger than the noise" in line and "within noise" not in line, line
            else:
                assert "within noise" in line and "larger than" not in line, line
            checked += 1
    assert checked == 4
    local = next(x for x in lines if "site-local models" in x)
    assert "beyond noise, than site-a" in local and "within noise of site-b" in local
    assert "synthetic" in reading and "112,120" in reading  # reasons come from the inputs


def test_dp_section_and_site_cards_come_from_the_inputs(rendered):
    _, md, _, _ = rendered
    dp = _section(md, "Differential privacy: ε per site and round")
    assert "| 3 | 0.560 | 0.500 |" in dp
    cards = _section(md, "Site data cards")
    assert "| site-a | 357 | 161 | 321 / 36 |" in cards
    assert "De-identification passed: 2,000 images" in md


def test_only_federated_renders_with_notes(tmp_path):
    metrics = json.loads((FIXTURE / "reports" / "metrics.json").read_text())
    only = {"federated": {"multilabel": metrics["federated"]["multilabel"]}}
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "metrics.json").write_text(json.dumps(only))
    result = render_report(
        ReportPaths().under(tmp_path), tmp_path / "report.md", tmp_path / "report.html"
    )
    md, page = result.markdown.read_text(), result.html.read_text()
    for heading in SECTIONS:
        assert f"## {heading}\n" in md and f">{html.escape(heading)}</h2>" in page
    note = next(line for line in md.splitlines() if "for task multilabel:" in line)
    assert "Single node" in note and "Centralized (multi-node)" in note
    assert "No efficiency figures" in md and "No site data cards" in md
    assert "DP was not enabled" in md and "No ROC curves" in md
    assert "0.712 ± 0.004 (0.692–0.732)" in md
    assert "Federated AUROC" in _section(md, "Reading the results")
    assert str(tmp_path / "reports" / "efficiency.json") in result.absent


def test_no_inputs_at_all_still_renders(tmp_path):
    result = render_report(ReportPaths().under(tmp_path), tmp_path / "r.md", tmp_path / "r.html")
    assert "No metrics were found" in result.markdown.read_text()
    assert result.figures == ()


def test_malformed_metrics_name_the_file(tmp_path):
    (tmp_path / "reports").mkdir()
    bad = tmp_path / "reports" / "metrics.json"
    bad.write_text(json.dumps({"federated": [0.7]}))
    with pytest.raises(ValueError, match=r"metrics\.json.*'federated'.*found list"):
        render_report(ReportPaths().under(tmp_path), tmp_path / "r.md", tmp_path / "r.html")
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"metrics\.json: expected valid JSON"):
        render_report(ReportPaths().under(tmp_path), tmp_path / "r.md", tmp_path / "r.html")


def test_judge_falls_back_on_confidence_intervals():
    a = {"auroc_macro": 0.80, "auroc_macro_lo": 0.78, "auroc_macro_hi": 0.82}
    b = {"auroc_macro": 0.70, "auroc_macro_lo": 0.68, "auroc_macro_hi": 0.72}
    near = {"auroc_macro": 0.79, "auroc_macro_lo": 0.77, "auroc_macro_hi": 0.81}
    assert judge(None, a, b).beyond_noise is True
    assert judge(None, a, near).beyond_noise is False
    assert judge({"delong_p": 0.2}, a, b).beyond_noise is False  # the test wins over CIs
    assert judge(None, {"auroc_macro": 0.8}, b).beyond_noise is None
    assert fmt.estimate({"f1": None}, "f1") == fmt.MISSING


# --- Learning curves, convergence, budgets, detectable differences ------------------------


def _render_variant(tmp_path: Path, edit=None, context: RunContext = CONTEXT) -> str:
    """The fixture report after `edit(metrics)` changed metrics.json; its Markdown."""
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    paths = ReportPaths().under(tmp_path)
    if edit is not None:
        metrics = json.loads(paths.metrics.read_text())
        edit(metrics)
        paths.metrics.write_text(json.dumps(metrics))
    result = render_report(paths, tmp_path / "r.md", tmp_path / "r.html", context=context)
    return result.markdown.read_text()


def _trainings(metrics: dict):
    return [
        (config, task, m["training"])
        for config, per_task in metrics.items()
        if config != "comparisons"
        for task, m in per_task.items()
        if "training" in m
    ]


def test_learning_curve_figure_has_a_panel_per_task_and_marks_non_converged_runs(rendered):
    result, md, page, _ = rendered
    data = load_inputs(ReportPaths().under(FIXTURE))
    assert set(data.learning) == {"multilabel", "pneumonia"}
    fig = learning_plot(data.learning, data.tasks())
    assert fig is not None and len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == [
        "Multi-label (14 findings)",
        "Pneumonia (binary)",
    ]
    legends = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes]
    assert "Federated + DP, 3 seeds (not converged)" in legends[0]
    assert "Federated, 3 seeds" in legends[0]  # converged: no mark
    assert "Site-local, 2 sites (not converged: site-b)" in legends[0]
    assert not [t for t in legends[1] if "(not converged" in t]  # pneumonia: all converged

    # DP (3 seeds) and site-b (3 seeds) end hollow on dashed lines; pneumonia none
    for ax, stalled in zip(fig.axes, (6, 0), strict=True):
        assert sum(ln.get_markerfacecolor() == "white" for ln in ax.get_lines()) == stalled
        assert sum(ln.get_linestyle() == "--" for ln in ax.get_lines()) == stalled
    assert learning_plot({}, ["multilabel"]) is None

    png = result.markdown.parent / "report_figures" / "learning_curves.png"
    assert png in result.figures
    section = _section(md, "Learning curves")
    assert "learning_curves.png" in section and "hollow marker on a dashed line" in section
    assert 'alt="Learning curves:' in _section(page, "Learning curves", md=False)


def test_convergence_table_lists_every_configuration(rendered):
    _, md, _, metrics = rendered
    section = _section(md, "Convergence and budgets")
    entries = _trainings(metrics)
    assert len(entries) == 8
    for config, task, t in entries:
        table = section[section.index(f"Convergence — {task_label(task)}") :]
        row = next(x for x in table.splitlines() if x.startswith(f"| {config_label(config)} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == str(t["epochs"])
        assert (
            cells[2] == f"{t['best_val_auroc']:.3f}" and cells[3] == f"{t['final_val_auroc']:.3f}"
        )
        assert cells[4] == ("yes" if t["converged"] else "no")
        assert ("still improving" in cells[5]) == (not t["converged"]), row
    rounds = metrics["federated"]["multilabel"]["training"]["rounds_to_reach"]
    assert "95% of the centralized model's final validation AUROC" in section
    assert f"{rounds:.1f} rounds (mean over seeds)" in section


def test_steps_follow_the_partition_and_batch_size(rendered):
    _, md, _, _ = rendered
    section = _section(md, "Convergence and budgets")
    partition = json.loads((FIXTURE / "reports" / "partition.json").read_text())
    n_k = {s: v["train"]["images"] for s, v in partition["sets"].items() if s != "test"}
    n = sum(n_k.values())
    steps = -(-n // paper.BATCH_SIZE)
    assert f"3 × ⌈{n}/{paper.BATCH_SIZE}⌉ = {3 * steps} optimizer steps on one model" in section
    assert "(assumed: the paper's batch size)" in section  # CONTEXT has no batch size
    per_site = ", ".join(f"{s} {-(-k // paper.BATCH_SIZE)}" for s, k in n_k.items())
    assert f"({per_site})" in section and "the global model moves 3 times" in section
    assert "is not E pooled epochs" in section


def test_budget_limited_appears_exactly_when_a_configuration_did_not_converge(rendered, tmp_path):
    _, md, _, metrics = rendered
    stalled = [(c, t) for c, t, e in _trainings(metrics) if not e["converged"]]
    assert stalled == [("federated_dp", "multilabel"), ("local_site-b", "multilabel")]
    reading = _section(md, "Reading the results")
    lines = [x for x in reading.splitlines() if x.startswith("- ")]
    assert lines[0].startswith("- Not converged — multi-label (14 findings): Federated + DP, ")
    flagged = [x for x in lines if "budget-limited" in x.lower()]
    assert len(flagged) == 3  # the opening line, Federated vs DP, the site-local line
    assert "Federated vs Federated + DP:" in flagged[1] and "Budget-limited" in flagged[1]
    assert "within noise of site-b (budget-limited)" in flagged[2]
    assert "site-a (budget-limited)" not in flagged[2]

    def all_converged(m: dict) -> None:
        for _, _, entry in _trainings(m):
            entry["converged"] = True

    converged = _render_variant(tmp_path, all_converged)
    assert "budget-limited" not in converged.lower()
    assert "- Every configuration converged" in _section(converged, "Reading the results")


def test_budget_sentence_says_whether_budgets_were_equal(rendered, tmp_path):
    _, md, _, metrics = rendered
    epochs = {t["epochs"] for _, _, t in _trainings(metrics)}
    assert epochs == {3}
    section = _section(md, "Convergence and budgets")
    assert "- Equal budgets: 3 epochs each" in section and "not equal" not in section

    def longer_federated(m: dict) -> None:
        for task in m["federated"]:
            m["federated"][task]["training"]["epochs"] = 5

    unequal = _section(_render_variant(tmp_path, longer_federated), "Convergence and budgets")
    assert "Equal budgets" not in unequal
    assert "Budgets are not equal" in unequal
    assert "5 epochs for Federated; 3 epochs for Federated + DP, Centralized" in unequal
    assert "fl.local_epochs=5" in unequal
    one_task = dict(metrics)
    one_task["federated"] = {
        "multilabel": {"training": {"epochs": 5}},
        "pneumonia": {"training": {"epochs": 3}},
    }
    assert "5 epochs for Federated (multi-label (14 findings))" in budgets.budget_sentence(
        {k: v for k, v in one_task.items() if k != "comparisons"}
    )


def test_each_comparison_gives_its_detectable_difference_and_the_claim_uses_it(rendered):
    _, md, _, metrics = rendered
    lines = [x for x in _section(md, "Reading the results").splitlines() if x.startswith("- ")]
    low, high, _ = paper.CLAIMED_GAIN_HEADLINE
    for task, comps in metrics["comparisons"].items():
        label = "Multi-label" if task == "multilabel" else "Pneumonia"
        for key, comp in comps.items():
            other = key.removeprefix("federated_vs_")
            if other.startswith("local_"):
                continue
            line = next(
                x
                for x in lines
                if x.startswith(f"- {label}") and f"Federated vs {config_label(other)}:" in x
            )
            assert f"80% power) is {comp['mdd_80']:.3f}." in line, line
            if other == "single_node":
                assert f"+{low:.1f} to +{high:.1f} AUROC points" in line
                assert high / 100 < comp["mdd_80"]  # the fixture: too small to detect
                assert "this test set cannot detect a difference of that size" in line
            else:
                assert "headline claim" not in line
    local = next(x for x in lines if "site-local models" in x)
    assert "Smallest detectable differences (80% power): 0.060–0.070." in local
    assert "cannot detect" in claim_sentence(high / 100 + 0.001)
    detectable = claim_sentence(low / 100)
    assert "can detect a difference of that size" in detectable and "cannot" not in detectable
    assert "straddles" in claim_sentence((low + high) / 200)
    assert claim_sentence(None) == ""


def test_reading_states_the_test_set(rendered):
    _, md, _, metrics = rendered
    fed = metrics["federated"]["multilabel"]
    reading = _section(md, "Reading the results")
    assert (
        f"- Test set (held out, every configuration): {fed['n_test_images']} test images, "
        f"{fed['n_test_patients']} patients; 0 pneumonia-positive images" in reading
    )


def test_judge_says_when_the_test_and_the_paired_ci_disagree():
    verdict = judge({"delong_p": 0.01, "auroc_diff_lo": -0.01, "auroc_diff_hi": 0.05}, None, None)
    assert verdict.beyond_noise is True and "mixed evidence" in verdict.evidence
    agree = judge({"bootstrap_p": 0.01, "auroc_diff_lo": 0.01, "auroc_diff_hi": 0.05}, None, None)
    assert "mixed" not in agree.evidence


def test_dp_section_names_the_accountant(rendered, tmp_path):
    _, md, _, _ = rendered
    assert "recorded neither" in _section(md, "Differential privacy: ε per site and round")
    rdp = RunContext(**{**CONTEXT.__dict__, "dp_accountant": "rdp"})
    dp = _section(
        _render_variant(tmp_path / "params", context=rdp),
        "Differential privacy: ε per site and round",
    )
    assert "Opacus's RDP accountant" in dp and "(dp.accountant: rdp)" in dp
    shutil.copytree(FIXTURE, tmp_path / "recorded", dirs_exist_ok=True)
    federated = tmp_path / "recorded" / "reports" / "federated.json"
    summary = json.loads(federated.read_text())
    for record in summary["per_round"]:
        for site in record["sites"].values():
            site["accountant"] = "prv"
    federated.write_text(json.dumps(summary))
    paths = ReportPaths().under(tmp_path / "recorded")
    result = render_report(paths, tmp_path / "r.md", tmp_path / "r.html", context=rdp)
    dp = _section(result.markdown.read_text(), "Differential privacy: ε per site and round")
    assert "Opacus's PRV accountant" in dp and f"as recorded in {federated}" in dp


def test_curves_are_optional_and_malformed_ones_name_the_file(tmp_path):
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    paths = ReportPaths().under(tmp_path)
    paths.curves.unlink()
    result = render_report(paths, tmp_path / "r.md", tmp_path / "r.html", context=CONTEXT)
    assert f"No learning curves: {paths.curves} is absent" in result.markdown.read_text()
    assert str(paths.curves) in result.absent
    paths.curves.write_text(
        json.dumps({"multilabel": {"federated": {"s1": {"curve": [[1]], "converged": True}}}})
    )
    with pytest.raises(ValueError, match=r"curves\.json: 'multilabel\.federated\.s1'\.curve"):
        render_report(paths, tmp_path / "r.md", tmp_path / "r.html")


# --- Grad-CAM -------------------------------------------------------------------------------


def test_gradcam_panel_on_a_tiny_untrained_smallcnn(tmp_path):
    torch.manual_seed(0)
    model = build_model("smallcnn", 14)
    images = np.random.default_rng(0).random((5, 48, 48))
    out = tmp_path / "gradcam.png"
    cams = gradcam_panel(model, "smallcnn", images, 3, out, [f"case {i}" for i in range(5)], 32)
    assert cams.shape == (5, 32, 32)  # where the maps point: test_gradcam_peaks_on_...
    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > png.height  # 2 rows x 4 columns
    fig = panel_figure(np.zeros((5, 32, 32)), cams, [f"case {i}" for i in range(5)])
    assert len(fig.axes) == 5  # one panel per image, the unused grid cells removed
    with pytest.raises(ValueError, match=r"target_class in 0\.\.13"):
        gradcam_panel(model, "smallcnn", images, 14, out)
    with pytest.raises(ValueError, match="5 titles"):
        gradcam_panel(model, "smallcnn", images, 0, out, ["only one"])


def _region_detector() -> torch.nn.Module:
    """A smallcnn whose class 0 is "how much bright area" and class 1 "how much dark area".

    Channel 0 carries ReLU(x) and channel 1 ReLU(-x) of the normalised image through every
    layer (centre taps, identity BatchNorm, other channels zero); the classifier reads channel
    0 for class 0 and channel 1 for class 1. The decision depends on the planted regions only.
    """
    model = build_model("smallcnn", 2)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.zero_()
                centre = module.kernel_size[0] // 2
                sign = -1.0 if module is model.stem[0] else 1.0  # stem: channel 1 gets -x
                module.weight[0, 0, centre, centre] = 1.0
                module.weight[1, 0 if module is model.stem[0] else 1, centre, centre] = sign
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()  # mean 0, var 1
                module.weight.fill_(1.0)
                module.bias.zero_()
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.weight[0, 0] = model.classifier.weight[1, 1] = 1.0
    return model.eval()


def test_gradcam_peaks_on_the_region_that_drives_the_class(tmp_path):
    # Grey images (0 after normalisation) with one bright and one dark 32 x 32 square, placed
    # off the diagonal and differently per image: a transposed, flipped, image-independent or
    # wrong-class map peaks elsewhere. Squares sit on the 16-px cells of the 8 x 8 target layer.
    size, side = 128, 32
    places = [((16, 80), (80, 16)), ((80, 64), (16, 16)), ((48, 0), (48, 96))]  # (bright, dark)
    images = np.full((len(places), size, size), 128, np.uint8)
    masks = {0: np.zeros(images.shape, bool), 1: np.zeros(images.shape, bool)}
    for i, places_i in enumerate(places):
        for cls, ((r, c), value) in enumerate(zip(places_i, (255, 0), strict=True)):
            images[i, r : r + side, c : c + side] = value
            masks[cls][i, r : r + side, c : c + side] = True
    model = _region_detector()
    logits = model(model_inputs(images)[0])
    assert torch.all(logits > 0.1)  # both regions are seen
    for cls in (0, 1):
        cams = gradcam_panel(model, "smallcnn", images, cls, tmp_path / f"c{cls}.png")
        assert cams.shape == images.shape
        for i, cam in enumerate(cams):
            peak = np.unravel_index(np.argmax(cam), cam.shape)
            assert masks[cls][i][peak], (cls, i, peak)
            inside, outside = cam[masks[cls][i]].mean(), cam[~masks[cls][i]].mean()
            assert inside > 5 * outside, (cls, i, inside, outside)


def test_gradcam_accepts_model_input_tensors_and_dp_safe_models(tmp_path):
    model = build_model("smallcnn", 1, dp_safe=True)
    cams = gradcam_panel(model, "smallcnn", torch.randn(2, 1, 32, 32), 0, tmp_path / "g.png")
    assert cams.shape == (2, 32, 32) and (tmp_path / "g.png").is_file()


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_every_registered_arch_has_a_gradcam_target_layer(arch):
    assert arch in TARGET_LAYERS
    assert isinstance(target_layer(build_model(arch, 1), arch), torch.nn.Module)


def test_unknown_arch_for_gradcam_names_the_registry():
    with pytest.raises(ValueError, match="smallcnn"):
        target_layer(build_model("smallcnn", 1), "vgg16")


def test_scaled_set_sizes_are_stated(tmp_path):
    shutil.copytree(FIXTURE, tmp_path, dirs_exist_ok=True)
    paths = ReportPaths().under(tmp_path)
    partition = json.loads(paths.partition.read_text())
    note = "sizes scaled in proportion (partition.fit auto): configured sum 112,120 -> 2,000"
    partition.update(exact_sizes=False, sizes={"note": note, "scaled": True})
    paths.partition.write_text(json.dumps(partition))
    result = render_report(paths, tmp_path / "r.md", tmp_path / "r.html", context=CONTEXT)
    md = result.markdown.read_text()
    assert f"Set sizes: {note} (not the configured counts)" in md
