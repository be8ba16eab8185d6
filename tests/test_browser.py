"""The whole user flow in a real headless Chromium (Debian's package) driven by Playwright.

Starts the app on a free port, picks a small generated dataset, trains, watches the live
chart gain points, opens Evaluate, clicks a confusion-matrix cell, predicts one image.
Screenshots of every page go to test-artifacts/screenshots/.
"""

import re
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, launch_chromium, make_dataset, serve_dashboard, stop_live_workers

SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
pytestmark = [pytest.mark.browser, pytest.mark.training]



@pytest.fixture
def app_server(tmp_path):
    """The dashboard, served by `streamlit run` on a free local port with its own runs and data folders."""
    data_dir = tmp_path / "appdata"
    make_dataset(data_dir / "colours", classes=("birds", "cats", "dogs"), per_class=16)
    environment = {"TRANSFER_STUDIO_RUNS": str(tmp_path / "runs"), "TRANSFER_STUDIO_DATA": str(data_dir),
                   "TRANSFER_STUDIO_OFFLINE": "1"}
    try:
        with serve_dashboard(tmp_path / "streamlit.log", environment) as url:
            yield url, data_dir, tmp_path / "runs"
    finally:
        # Runs the browser started outlive the server by design (detached workers): end them too.
        stop_live_workers(tmp_path / "runs")


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        yield context.new_page()
        browser.close()


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    # Wait for the page to finish drawing: the script no longer running, and no placeholders
    # left where elements are still loading.
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60000)
    page.wait_for_function("document.querySelectorAll('[data-testid=\"stSkeleton\"]').length === 0", timeout=30000)
    page.wait_for_timeout(800)
    # The main area scrolls inside the page; a tall viewport captures all of it. Charts and
    # images lay themselves out again for the new size before the picture is taken.
    height = page.evaluate("document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight || 800")
    page.set_viewport_size({"width": 1280, "height": max(800, min(int(height) + 100, 4000))})
    page.wait_for_timeout(1500)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)
    page.set_viewport_size({"width": 1280, "height": 800})


def choose(page, label: str, option_text: str) -> None:
    """Picks an option of a Streamlit selectbox by its label."""
    box = page.locator("[data-testid='stSelectbox']").filter(has_text=label).first
    box.click()
    page.get_by_role("option", name=re.compile(re.escape(option_text))).first.click()


def field(page, label: str):
    """The input of a Streamlit text or number widget, by its exact label."""
    return page.locator(f"input[aria-label='{label}']").first


def go(page, title: str) -> None:
    page.locator("[data-testid='stSidebarNav'] a").filter(has_text=title).first.click()
    page.get_by_role("heading", name=title, exact=True).wait_for(timeout=30000)


def plotted_points(page, chart_index: int) -> int:
    return page.locator("[data-testid='stPlotlyChart']").nth(chart_index).locator("path.point").count()


def pick_cell_to_click(runs_dir: Path):
    """A non-empty validation cell that is not the one the page opens on (the most confused pair)."""
    from engine import runfiles
    from engine.interpret import most_confused

    run_dir = next(entry for entry in runs_dir.iterdir() if entry.is_dir())
    result = runfiles.read_json(run_dir / "evaluation.json")["splits"]["validation"]
    classes, matrix = result["classes"], result["confusion_matrix"]
    pairs = most_confused(result)
    opening = (pairs[0][0], pairs[0][1]) if pairs else (classes[0], classes[0])
    for row, true in enumerate(classes):
        for column, predicted in enumerate(classes):
            if matrix[row][column] and (true, predicted) != opening:
                return true, predicted, row, column, len(classes)
    raise AssertionError(f"no second non-empty cell to click in {matrix}")


def test_new_user_trains_watches_explores_and_predicts(app_server, page):
    from playwright.sync_api import expect

    url, data_dir, runs_dir = app_server
    page.goto(url)
    page.get_by_role("heading", name="Transfer Studio").wait_for(timeout=30000)
    screenshot(page, "1-home")

    go(page, "Data")
    page.get_by_text("Folder on the server").click()
    choose(page, "Dataset folder", "colours")
    page.get_by_role("button", name="Use this folder").click()
    page.get_by_text("Usable images").wait_for(timeout=30000)
    expect(page.locator("[data-testid='stMetricValue']").nth(1)).to_have_text("48", timeout=30000)
    screenshot(page, "2-data")
    page.get_by_text("Data doctor: duplicates, near-duplicates, leakage").click()
    # The doctor's three counts appear (these generated images are noisy, so all three are 0).
    page.get_by_text("Near-duplicate pairs").wait_for(timeout=60000)
    expect(page.get_by_text("Leaks")).to_be_visible()
    screenshot(page, "2b-data-doctor")

    page.get_by_role("button", name="Train on this data").click()
    page.get_by_role("heading", name="Train", exact=True).wait_for(timeout=30000)
    expect(field(page, "Dataset folder")).to_have_value(re.compile(r"colours$"), timeout=30000)
    # The defaults (checked in test_pages): EfficientNet-Lite0 with the ImageNet weights that install with the app.
    field(page, "Image size (px)").fill("96")
    # Head epochs on cached features take milliseconds here, so enough of them to watch live.
    field(page, "Epochs").fill("150")
    field(page, "Batch size").fill("4")
    screenshot(page, "3-train")
    page.get_by_role("button", name="Start training").click()

    page.get_by_role("heading", name="Monitor", exact=True).wait_for(timeout=30000)
    page.get_by_test_id("stAlertContentInfo").get_by_text("RUNNING").wait_for(timeout=90000)
    page.wait_for_function("document.querySelectorAll('[data-testid=\"stPlotlyChart\"] path.point').length > 0",
                           timeout=90000)
    before = plotted_points(page, 1)
    page.wait_for_function(
        f"document.querySelectorAll('[data-testid=\"stPlotlyChart\"]')[1].querySelectorAll('path.point').length > {before}",
        timeout=90000)
    assert plotted_points(page, 1) > before, "the live chart did not gain points without any user action"
    page.get_by_test_id("stAlertContentSuccess").get_by_text("FINISHED").wait_for(timeout=180000)
    screenshot(page, "4-monitor")

    go(page, "Evaluate")
    true, predicted, row, column, size = pick_cell_to_click(runs_dir)
    page.set_viewport_size({"width": 1280, "height": 1600})  # the whole matrix on screen
    # The confusion matrix by its key (Streamlit gives keyed elements the class st-key-<key>): the
    # calibration and precision-recall charts come before it.
    chart = page.locator(".st-key-confusion [data-testid='stPlotlyChart']").first
    chart.wait_for(timeout=30000)
    chart.scroll_into_view_if_needed()
    page.wait_for_timeout(1500)
    area = chart.locator(".nsewdrag").first.bounding_box()
    centre = (area["x"] + area["width"] * (column + 0.5) / size, area["y"] + area["height"] * (row + 0.5) / size)
    page.mouse.move(*centre)  # Plotly reports a click on the point it is hovering
    page.wait_for_timeout(500)
    page.mouse.click(*centre)
    page.get_by_text(f"True {true}, answered {predicted}").wait_for(timeout=30000)
    # The grid redraws after the click: wait for the clicked cell's images, not the old ones.
    captions = page.locator("[data-testid='stImageCaption']", has_text=f"{true} → {predicted}")
    captions.first.wait_for(timeout=30000)
    assert f"{true} → {predicted}" in captions.first.inner_text()
    page.set_viewport_size({"width": 1280, "height": 800})
    screenshot(page, "5-evaluate")

    go(page, "Predict")
    sample = next((data_dir / "colours" / "cats").glob("*.png"))
    page.locator("input[type='file']").first.set_input_files(str(sample))
    verdict = page.get_by_role("heading", name=re.compile(r"— \d+%"))
    verdict.wait_for(timeout=60000)
    assert verdict.inner_text().startswith("cats"), "real ImageNet features tell red from blue and green"
    page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=30000)  # the probability bars
    screenshot(page, "6-predict")
    assert not page.locator("[data-testid='stException']").count()
