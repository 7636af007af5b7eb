"""The MLflow UI (3.17) on a finished quick sweep, in headless Chromium, as a user opens it: the
runs table's accuracy view, the parent run's comparison table, a trial's headline accuracies.

Needs Chromium (Debian: `apt-get install -y chromium`) and Playwright (`pip install -e '.[test]'`;
its own browser download is not used). Without them the test is skipped, except in CI (CI=true),
where it fails. `LLM_SWEEPER_SCREENSHOTS=docs` runs the quick sweep at full length instead of cut
short and writes README's screenshots there (docs/ui_runs.png, ui_parent.png, ui_trial.png).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow_servers import MlflowServer

from sweeper import notes

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")]

REPO = Path(__file__).resolve().parents[1]
SHORT = ["train.total_steps=4", "eval.max_examples=16", "tracking.flush_every=2"]
VIEWPORT = {"width": 1400, "height": 900}
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def chromium_path() -> str:
    """Debian's Chromium, driven by Playwright; skipped (failed in CI) when either is missing."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[test]')"
    else:
        found = shutil.which("chromium") or shutil.which("chromium-browser")
        if found:
            return found
        missing = "no chromium on PATH (Debian: apt-get install -y chromium)"
    if IN_CI:
        pytest.fail(f"CI must run the browser test: {missing}")
    pytest.skip(missing)


@pytest.fixture(scope="module")
def finished_sweep(sweeper_env, tmp_path_factory):
    """conf/sweep/quick_cpu.yaml in its own SQLite store (cut short unless screenshots are wanted),
    then an `mlflow server` on it, on 127.0.0.1 and a free port, stopped at the end."""
    browser = chromium_path()
    folder = tmp_path_factory.mktemp("browser_sweep")
    short = [] if os.environ.get("LLM_SWEEPER_SCREENSHOTS") else SHORT
    result = subprocess.run(
        [sys.executable, "-m", "sweeper", "-m", "sweep=quick_cpu", *short, f"tracking.uri=sqlite:///{folder}/mlflow.db",
         f"hydra.sweep.dir={folder}/sweep"],
        cwd=REPO, env=sweeper_env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment_id = client.get_experiment_by_name("rotten_tomatoes").experiment_id
    runs = client.search_runs([experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = sorted((r for r in runs if "mlflow.parentRunId" in r.data.tags), key=lambda r: int(r.data.tags["sweeper.trial"]))
    server = MlflowServer(folder, store=f"sqlite:///{folder}/mlflow.db").start()
    try:
        yield browser, server.url, experiment_id, parent, children
    finally:
        server.stop()


@pytest.fixture()
def page(finished_sweep):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=finished_sweep[0], args=["--no-sandbox"])
        try:
            yield browser.new_page(viewport=VIEWPORT)
        finally:
            browser.close()


def settle(page) -> None:
    """Close MLflow's assistant panel, which opens itself on a first visit and covers a third of the page."""
    close = page.get_by_role("button", name="Close", exact=True)
    if close.count():
        close.first.click()


def screenshot(page, name: str, tmp_path: Path) -> None:
    """Into tmp_path always; into $LLM_SWEEPER_SCREENSHOTS too, as a 256-colour PNG (a fraction of the size)."""
    from PIL import Image

    png = page.screenshot(path=str(tmp_path / f"{name}.png"))
    folder = os.environ.get("LLM_SWEEPER_SCREENSHOTS")
    if folder:
        target = (REPO / folder) if not Path(folder).is_absolute() else Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        image.save(target / f"{name}.png", optimize=True)


def close_to(text: str, value: float) -> bool:
    return abs(float(text) - value) < 5e-4  # the table shows up to 4 decimals


def test_the_runs_table_view_shows_every_trials_test_accuracy(finished_sweep, page, tmp_path):
    _, url, experiment_id, parent, children = finished_sweep
    page.goto(f"{url}/{notes.view_link(experiment_id)}")  # the link in the parent's and experiment's descriptions
    page.get_by_text(parent.info.run_name, exact=True).first.wait_for(timeout=60_000)
    settle(page)
    # The experiment's description is shown above the table.
    assert page.get_by_text("one parent run per sweep", exact=False).first.is_visible()
    page.locator('.ag-row [col-id="attributes.`Run Name`"]').filter(has_text=parent.info.run_name) \
        .locator("button").first.click()  # expand the sweep: its trials nested under it
    for child in children:
        page.get_by_text(child.info.run_name, exact=True).wait_for(timeout=30_000)
        row = page.locator(f'.ag-center-cols-container .ag-row[row-id="{child.info.run_id}"]')
        test = row.locator('[col-id="metrics.`accuracy/test`"]').inner_text()
        validation = row.locator('[col-id="metrics.`accuracy/validation`"]').inner_text()
        assert close_to(test, child.data.metrics["test_accuracy"]), (child.info.run_name, test)
        assert close_to(validation, child.data.metrics["validation_accuracy"]), (child.info.run_name, validation)
    # The run names are told apart in the column as drawn: none is cut short.
    names = page.locator('.ag-row [col-id="attributes.`Run Name`"] a > span')  # the element that ellipsises
    clipped = names.evaluate_all("els => els.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText)")
    assert clipped == [], clipped
    screenshot(page, "ui_runs", tmp_path)


def test_the_parent_run_shows_the_sweeps_comparison_table(finished_sweep, page, tmp_path):
    _, url, experiment_id, parent, children = finished_sweep
    page.goto(f"{url}/{notes.run_link(experiment_id, parent.info.run_id)}")
    page.get_by_text("Best by validation accuracy", exact=False).first.wait_for(timeout=60_000)
    settle(page)
    more = page.get_by_text("Show more", exact=True)
    if more.count():
        more.first.click()
    table = page.locator("table").filter(has_text="lr ↓ · ratio →").first  # test accuracy, then validation
    table.wait_for()
    page.get_by_role("link", name=children[-1].info.run_name).first.wait_for()  # "Child runs", for the picture
    cells = table.locator("tr").evaluate_all("rows => rows.map(r => [...r.cells].map(c => c.innerText.trim()))")
    header, rows = cells[0], {row[0]: row[1:] for row in cells[1:]}
    for child in children:
        lr, ratio = child.data.params["lr"], child.data.params["ratio"]
        row = next(v for k, v in rows.items() if float(k) == float(lr))
        shown = row[[float(c) for c in header[1:]].index(float(ratio))]
        assert shown == f"{child.data.metrics['test_accuracy']:.2%}", (lr, ratio, shown)
    best = max(children, key=lambda c: c.data.metrics["validation_accuracy"])  # the earliest among equals
    assert table.locator("strong").first.inner_text() == f"{best.data.metrics['test_accuracy']:.2%}"
    screenshot(page, "ui_parent", tmp_path)


def test_a_trial_run_leads_with_its_accuracies(finished_sweep, page, tmp_path):
    _, url, experiment_id, parent, children = finished_sweep
    child = children[0]
    page.goto(f"{url}/{notes.run_link(experiment_id, child.info.run_id)}")
    headline = f"Test accuracy {child.data.metrics['test_accuracy']:.2%}"
    page.get_by_text(headline, exact=False).first.wait_for(timeout=60_000)
    settle(page)
    page.get_by_placeholder("Search metrics").first.wait_for()
    listed = page.locator("a").filter(has_text="accuracy").evaluate_all("els => els.map(e => e.innerText.trim())")
    # In the run's metrics table the headline copies come before the other accuracies.
    assert listed.index("accuracy/test") < listed.index("before_test_accuracy") < listed.index("test_accuracy"), listed
    to_parent = page.get_by_role("link", name=parent.info.run_name)  # the description's, then "Parent run"
    to_parent.nth(1).wait_for()
    assert to_parent.count() == 2
    screenshot(page, "ui_trial", tmp_path)
