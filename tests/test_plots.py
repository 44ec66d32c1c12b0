"""`dvc plots show` / `dvc plots diff` pages render with no network.

In a temporary copy of the repository (the tracked files and .dvc/plots/page.html,
the page template `make` generates from node_modules) with small synthetic plot
data, the test runs DVC, then opens the page in Debian's headless Chromium with
every host unresolvable and a dead proxy, and counts the charts vega-embed drew
(one <canvas class="marks"> per chart): a page that still loaded Vega from the
CDN shows only the filters image. It also checks the plot specs (train and val
in their own colours, the confusion matrix oriented as reports/confusion_matrix.png)
and looks for both line colours in a screenshot.
"""

import csv
import json
import re
import shutil
import subprocess
import sys
import pytest

from conftest import copy_checkout
from pipeline.config import PROJECT_ROOT

PAGE = PROJECT_ROOT / ".dvc" / "plots" / "page.html"
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
DVC = [sys.executable, "-m", "dvc"]
TRAIN_COLOUR, VAL_COLOUR = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # .dvc/plots/train_val.json's range
CHARTS = 3  # loss, accuracy, confusion; filters.png is an <img>

needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
)


def _git(repo, *args):
    subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args],
        cwd=repo, check=True, capture_output=True,
    )


def _write_history(path, epochs, shift=0.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                    "time_epoch_seconds", "train_lr"])
        for e in range(1, epochs + 1):
            w.writerow([e, 0.6 / e + 0.2 + shift, 0.95 - 0.1 / e - shift, 0.5 / e + 0.25 + shift,
                        0.93 - 0.08 / e - shift, 1.5, 0.1])


def _write_confusion(path):
    """actual,predicted rows: mostly right, plus an asymmetric mistake (actual 4 read as 9)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["actual", "predicted"])
        for k in range(10):
            w.writerows([[k, k]] * 20)
        w.writerows([[4, 9]] * 8)


def _write_png(path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 20), (128, 128, 128)).save(path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The repository's files in a fresh git repo, without dvc.lock (its hashes are of
    the real outputs; without it DVC reads the workspace), with synthetic plot data
    committed as HEAD and changed in the workspace (for `dvc plots diff`)."""
    if not PAGE.is_file():
        pytest.fail(f"{PAGE.relative_to(PROJECT_ROOT)} is missing: run `make .venv/.installed` "
                    "(npm ci, then node scripts/plots-template.js)")
    root = tmp_path_factory.mktemp("plots_repo")
    copy_checkout(root, skip={"dvc.lock"})
    (root / PAGE.relative_to(PROJECT_ROOT)).write_bytes(PAGE.read_bytes())  # generated, git-ignored
    for ignore in ("models/.gitignore", "reports/.gitignore"):  # commit the outs in git here
        (root / ignore).unlink(missing_ok=True)
    (root / ".gitignore").write_text((root / ".gitignore").read_text().replace("/filters\n", ""))
    _write_history(root / "models/history.csv", 6)
    _write_confusion(root / "reports/confusion.csv")
    _write_png(root / "filters/filters.png")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "plots fixture")
    _write_history(root / "models/history.csv", 4, shift=0.02)  # the workspace differs from HEAD
    return root


def _dvc(repo, *args):
    out = subprocess.run([*DVC, *args], cwd=repo, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "failed to load" not in (out.stdout + out.stderr), out.stdout + out.stderr
    html = repo / "dvc_plots" / "index.html"
    assert html.is_file(), out.stdout + out.stderr
    return html


def _chromium(tmp_path, *args):
    """Headless Chromium with the network blocked: no host resolves, any proxy use fails."""
    out = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
         f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
         "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _specs(html):
    """The Vega-Lite spec of each chart, as DVC embeds it: `var spec = {...};`."""
    return [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\n", html.read_text(), flags=re.S)]


def _assert_offline_page(html, tmp_path):
    text = html.read_text()
    assert "<script src=" not in text and "cdn.jsdelivr" not in text, "the page still loads scripts from a URL"
    dom = _chromium(tmp_path, "--dump-dom", html.as_uri())
    body = dom[dom.index("<body"):]  # the inlined libraries' code holds <img> templates
    images = re.findall(r'<img src="([^"]+)"', body)
    drawn = re.findall(r'<canvas[^>]*class="marks"', body) + re.findall(r'<svg[^>]*class="marks"', body)
    assert len(drawn) == CHARTS, f"{len(drawn)} of {CHARTS} charts rendered offline"
    assert images and all((html.parent / src).is_file() for src in images), images


@needs_chromium
def test_plots_show_renders_offline_with_distinct_colours_and_oriented_confusion(repo, tmp_path):
    html = _dvc(repo, "plots", "show")
    _assert_offline_page(html, tmp_path)

    specs = {spec["title"]["text"]: spec for spec in _specs(html)}
    assert set(specs) == {"Loss per epoch", "Accuracy per epoch", "Confusion matrix (test)"}, set(specs)
    for title, fields in [("Loss per epoch", {"train_loss", "val_loss"}),
                          ("Accuracy per epoch", {"train_accuracy", "val_accuracy"})]:
        spec = specs[title]
        assert spec["encoding"]["color"]["field"] == "field", f"{title}: colour is not per y field"
        assert {row["field"] for row in spec["data"]["values"]} == fields, title
    encoding = specs["Confusion matrix (test)"]["spec"]["encoding"]
    # As reports/confusion_matrix.png: predicted on the x axis, actual on the y axis.
    assert (encoding["x"]["field"], encoding["y"]["field"]) == ("predicted", "actual"), encoding

    shot = tmp_path / "plots.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2400", html.as_uri())
    import numpy as np
    from PIL import Image
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)

    def near(colour):
        return int((np.abs(pixels - np.array(colour)) <= 12).all(axis=-1).sum())

    # The val colour appears nowhere else on the page (grey fixture image, blue-green heat map).
    assert near(TRAIN_COLOUR) > 100 and near(VAL_COLOUR) > 100, (near(TRAIN_COLOUR), near(VAL_COLOUR), shot)


@needs_chromium
def test_plots_diff_renders_offline(repo, tmp_path):
    html = _dvc(repo, "plots", "diff")  # HEAD against the workspace
    _assert_offline_page(html, tmp_path)
    revs = {row["rev"] for spec in _specs(html) for row in spec["data"]["values"]}
    assert revs == {"HEAD", "workspace"}, revs


def test_page_template_is_the_generated_one():
    """.dvc/config names the generated page; it inlines the pinned npm packages, no CDN."""
    assert PAGE.is_file(), "run `make .venv/.installed` (npm ci, then node scripts/plots-template.js)"
    config = (PROJECT_ROOT / ".dvc" / "config").read_text()
    assert re.search(r"^\s*html_template\s*=\s*plots/page\.html\s*$", config, flags=re.M), config
    page = PAGE.read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page and "<script src=" not in page
    lock = json.loads((PROJECT_ROOT / "package-lock.json").read_text())["packages"]
    for name in ("vega", "vega-lite", "vega-embed"):
        version = lock[f"node_modules/{name}"]["version"]
        assert f'data-package="{name}@{version}"' in page, f"{name}@{version} not inlined: rerun make"
