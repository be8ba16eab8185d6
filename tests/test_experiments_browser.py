"""Sweeps and Compare in a real headless Chromium (Debian's package) driven by Playwright.

A tiny two-run sweep (two learning rates) runs through the real queue; the dashboard then shows
its leaderboard, and "Compare the top two" opens Compare with both runs, the settings that
differ, the verdict and the image grids. Screenshots go to the test's temporary folder.
"""

import re

import pytest

from tests.conftest import launch_chromium, make_dataset, screenshot_whole_page, serve_dashboard, tiny_config

# slow: a real sweep and a browser, 75 s; make test-all runs it (make test stays under its time budget).
pytestmark = [pytest.mark.browser, pytest.mark.training, pytest.mark.slow]


@pytest.fixture
def finished_sweep(runs_dir, tmp_path):
    from engine.sweeps import parse_grid, start_sweep, wait_for_sweep

    data = make_dataset(tmp_path / "colours", classes=("cats", "dogs"), per_class=12)
    sweep = start_sweep(tiny_config(data, **{"data.cache": "memory"}),
                        parse_grid(["training.learning_rate=1e-4,1e-2"]), runs_dir, name="colour sweep")
    statuses = wait_for_sweep(sweep, runs_dir, timeout=300)
    assert all(status.state.value == "finished" for status in statuses), [status.message for status in statuses]
    return sweep


def test_the_leaderboard_leads_to_compare_with_the_verdict_and_the_images(finished_sweep, runs_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    environment = {"TRANSFER_STUDIO_RUNS": str(runs_dir), "TRANSFER_STUDIO_DATA": str(tmp_path / "appdata"),
                   "TRANSFER_STUDIO_OFFLINE": "1"}
    with serve_dashboard(tmp_path / "streamlit.log", environment) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
        page.goto(f"{url}/sweeps")
        page.get_by_role("heading", name="Sweeps", exact=True).wait_for(timeout=60000)
        main = page.get_by_test_id("stMainBlockContainer")
        expect(main.get_by_text("Best on validation:")).to_be_visible(timeout=60000)
        # The grid draws on a canvas; its accessible cells carry the values once it has drawn.
        grid_cells = main.get_by_test_id("stDataFrame").locator("td, [role=gridcell]")
        grid_cells.first.wait_for(state="attached", timeout=30000)
        cells = grid_cells.all_inner_texts()
        assert {"colour sweep · learning_rate=0.0001", "colour sweep · learning_rate=0.01"} <= set(cells), cells
        screenshot_whole_page(page, tmp_path / "sweeps.png")

        main.get_by_role("link", name="Compare the top two").click()
        page.get_by_role("heading", name="Compare", exact=True).wait_for(timeout=60000)
        expect(main.get_by_role("heading", name="What differs")).to_be_visible(timeout=60000)
        expect(main.get_by_text("training.learning_rate")).to_be_attached()  # a grid cell (drawn on a canvas)
        verdict = main.get_by_text(
            re.compile(r"(is better than .* on these \d+ validation images|are not distinguishable on "
                                     r"these \d+ validation images|right and wrong on exactly the same images)"))
        expect(verdict).to_be_visible(timeout=60000)
        expect(main.get_by_text("Both right")).to_be_visible()
        for entry in finished_sweep["runs"]:
            assert entry["run_id"] in page.url  # both runs are in the address: a link reopens the comparison
        screenshot_whole_page(page, tmp_path / "compare.png")
        browser.close()
    assert (tmp_path / "sweeps.png").stat().st_size > 10_000 and (tmp_path / "compare.png").stat().st_size > 10_000
