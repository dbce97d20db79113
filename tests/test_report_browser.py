"""The HTML report in a real browser (headless Chromium): it renders, every image decodes, it
fits a 1280-px window without horizontal scrolling, and it requests nothing beyond itself."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedcxr.report.inputs import ReportPaths, RunContext
from fedcxr.report.render import render_report

FIXTURE = Path(__file__).parent / "fixtures" / "report"
CONTEXT = RunContext(data_source="synthetic", arch="smallcnn", image_size=128, seeds=(1, 2, 3))
WIDTH = 1280
REQUIRE_ENV = "FEDCXR_REQUIRE_BROWSER"
RESULT_ID = "fedcxr-browser-probe"

# Appended to a copy of the page only (never to the report). After `load` it writes what it
# measured as JSON into a <pre>, which --dump-dom prints.
PROBE = """<script>
(() => {
  const errors = [];
  window.addEventListener("error", (e) => errors.push(String(e.message || e.type)));
  window.addEventListener("load", () => {
    const root = document.documentElement;
    const external = (url) => url && !url.startsWith("data:") && !url.startsWith("#")
      && url !== location.href;
    const refs = [];
    for (const el of document.querySelectorAll("[src], [href], [srcset], [poster], [data]")) {
      for (const attr of ["src", "href", "srcset", "poster", "data"]) {
        const value = el.getAttribute(attr);
        if (value !== null && external(value)) refs.push(`${el.tagName} ${attr}=${value}`);
      }
    }
    for (const sheet of document.styleSheets) {
      for (const rule of sheet.cssRules) {
        for (const m of rule.cssText.matchAll(/url\\(\\s*["']?([^"')]*)/g)) {
          if (external(m[1])) refs.push(`css url(${m[1]})`);
        }
        if (rule.type === CSSRule.IMPORT_RULE) refs.push(`css @import ${rule.href}`);
      }
    }
    const right = root.clientWidth;
    const result = {
      readyState: document.readyState,
      title: document.title,
      h1: (document.querySelector("h1") || {}).textContent || "",
      errors,
      innerWidth: window.innerWidth,
      clientWidth: root.clientWidth,
      scrollWidth: root.scrollWidth,
      bodyScrollWidth: document.body.scrollWidth,
      images: [...document.images].map((img) => ({
        alt: img.alt.slice(0, 60), complete: img.complete, naturalWidth: img.naturalWidth,
      })),
      // Tables wider than the page (an overflow-x wrapper would hide this from scrollWidth).
      tooWide: [...document.querySelectorAll("body *")]
        .filter((el) => el.getBoundingClientRect().right > right + 0.5
          || (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== "visible"))
        .map((el) => `${el.tagName} ${(el.textContent || "").trim().slice(0, 50)}`)
        .slice(0, 10),
      resources: performance.getEntriesByType("resource").map((e) => e.name),
      navigation: performance.getEntriesByType("navigation").map((e) => e.name),
      refs,
    };
    const pre = document.createElement("pre");
    pre.id = "@RESULT_ID@";
    pre.textContent = JSON.stringify(result);
    document.body.appendChild(pre);
  });
})();
</script>
""".replace("@RESULT_ID@", RESULT_ID)


@pytest.fixture(scope="module")
def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and Path("/usr/bin/chromium").is_file():
        found = "/usr/bin/chromium"
    if found is None:
        why = (
            "headless Chromium not found (expected `chromium` on PATH or /usr/bin/chromium; "
            "Debian: apt-get install chromium; scripts/test.sh installs it when run as root)"
        )
        if os.environ.get(REQUIRE_ENV):
            pytest.fail(f"{why}, and {REQUIRE_ENV} is set")
        pytest.skip(why)
    return found


def probe(chromium: str, page: Path, workdir: Path) -> dict:
    """Open a copy of `page` with PROBE appended in a 1280-px headless Chromium, network off."""
    copy = workdir / "page" / page.name
    copy.parent.mkdir(parents=True)
    text = page.read_text()
    assert text.count("</body>") == 1, f"{page}: expected one </body>"
    copy.write_text(text.replace("</body>", PROBE + "</body>"))
    argv = [
        chromium,
        "--headless",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves
        "--proxy-server=http://127.0.0.1:9",  # and an IP address goes to a closed port
        f"--user-data-dir={workdir / 'profile'}",
        f"--window-size={WIDTH},900",
        "--virtual-time-budget=5000",
        "--dump-dom",
        copy.as_uri(),
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    found = re.search(rf'<pre id="{RESULT_ID}">(.*?)</pre>', done.stdout, re.S)
    assert found, (
        f"chromium printed no probe result for {copy} (exit {done.returncode}); "
        f"stderr tail:\n{done.stderr[-2000:]}"
    )
    result = json.loads(html.unescape(found.group(1)))
    result["url"] = copy.as_uri()
    return result


def problems(result: dict) -> list[str]:
    """What is wrong with a probed page; empty when it renders, fits and fetches nothing."""
    out = []
    if result["readyState"] != "complete" or not result["h1"]:
        out.append(f"did not render: readyState {result['readyState']}, h1 {result['h1']!r}")
    out += [f"script error: {e}" for e in result["errors"]]
    if not result["images"]:
        out.append("no <img> at all")
    out += [
        f"image does not decode: {img['alt']!r}"
        for img in result["images"]
        if not img["complete"] or img["naturalWidth"] <= 0
    ]
    if result["innerWidth"] != WIDTH:
        out.append(f"window is {result['innerWidth']} px wide, expected {WIDTH}")
    for key in ("scrollWidth", "bodyScrollWidth"):
        if result[key] > min(WIDTH, result["clientWidth"]):
            out.append(f"{key} {result[key]} px > window {result['clientWidth']} px")
    out += [f"wider than the window or scrolling inside: {e}" for e in result["tooWide"]]
    out += [f"fetches {url}" for url in result["resources"] if not url.startswith("data:")]
    out += [f"navigated to {url}" for url in result["navigation"] if url != result["url"]]
    out += [f"references {ref}" for ref in result["refs"]]
    return out


@pytest.fixture(scope="module")
def report_html(tmp_path_factory) -> Path:
    """The report built from the test fixtures, as the report stage builds it."""
    root = tmp_path_factory.mktemp("browser")
    shutil.copytree(FIXTURE, root, dirs_exist_ok=True)
    gradcam = root / "reports" / "figures" / "gradcam_pneumonia.png"
    gradcam.parent.mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(gradcam)
    out = root / "out"
    result = render_report(
        ReportPaths().under(root), out / "report.md", out / "report.html", context=CONTEXT
    )
    return result.html


def test_report_renders_fits_1280_px_and_fetches_nothing(chromium, report_html, tmp_path):
    before = report_html.read_bytes()
    result = probe(chromium, report_html, tmp_path)
    assert report_html.read_bytes() == before and RESULT_ID.encode() not in before
    assert problems(result) == [], json.dumps(result, indent=1)[:4000]
    # forest, learning curves, ROC x2, per-round federated curves, epsilon, Grad-CAM
    assert len(result["images"]) == 7
    assert result["images"][0]["alt"].startswith("Test AUROC of every configuration")


def test_the_probe_sees_broken_wide_and_external_pages(chromium, tmp_path):
    # A check that cannot fail proves nothing: a page with each defect is caught.
    page = tmp_path / "bad.html"
    page.write_text(
        "<!DOCTYPE html><html><head><style>p { background: url(http://198.51.100.7/bg.png) }"
        "</style></head><body><h1>bad</h1><p>x</p>"
        '<img alt="broken" src="data:image/png;base64,AAAA">'
        '<img alt="remote" src="http://198.51.100.7/x.png">'
        '<div style="overflow-x:auto"><table><tr><td style="white-space:nowrap">'
        + "wide " * 400
        + "</td></tr></table></div></body></html>"
    )
    found = "\n".join(problems(probe(chromium, page, tmp_path)))
    assert "image does not decode: 'broken'" in found
    assert "image does not decode: 'remote'" in found
    assert "IMG src=http://198.51.100.7/x.png" in found
    assert "fetches http://198.51.100.7/x.png" in found  # tried, though the network is off
    assert "css url(http://198.51.100.7/bg.png)" in found
    assert "wider than the window or scrolling inside: DIV" in found
