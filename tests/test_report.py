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
from fedcxr.report import fmt
from fedcxr.report.gradcam import (
    TARGET_LAYERS,
    gradcam_panel,
    model_inputs,
    panel_figure,
    target_layer,
)
from fedcxr.report.inputs import ReportPaths, RunContext
from fedcxr.report.reading import judge
from fedcxr.report.render import SECTIONS, render_report
from fedcxr.report.tables import config_label

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
    # 4 generated figures (ROC x2, training curves, epsilon) + the Grad-CAM panel
    assert len(sources) == len(result.figures) + 1 == 5
    assert all(s.startswith("data:image/png;base64,") for s in sources)


def test_markdown_links_figures_that_exist(rendered):
    result, md, _, _ = rendered
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 5
    for link in links:
        assert (result.markdown.parent / link).is_file(), link


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
