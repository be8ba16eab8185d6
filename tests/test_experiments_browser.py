"""Sweeps and Compare in a real headless Chromium (Debian's package) driven by Playwright.

On the Train page a tiny two-run sweep (two learning rates) is set up and started as a user
would: the form filled in, the learning rates typed into the Sweep section, "Start sweep"
pressed. The dashboard opens the Sweeps page on it; once both runs have finished through the
real queue, its leaderboard leads to Compare with both runs, the settings that differ, the
verdict and the image grids. Screenshots go to the test's temporary folder.
"""

import re

import pytest

from tests.conftest import launch_chromium, make_dataset, screenshot_whole_page, serve_dashboard

# slow: a real sweep and a browser, 75 s; make test-all runs it (make test stays under its time budget).
pytestmark = [pytest.mark.browser, pytest.mark.training, pytest.mark.slow]


def field(main, label: str):
    """The input of a Streamlit text or number widget, by its exact label."""
    return main.locator(f"input[aria-label='{label}']").first


def choose(page, main, label: str, option_text: str) -> None:
    """Picks an option of a Streamlit selectbox by its label."""
    main.locator("[data-testid='stSelectbox']").filter(has_text=label).first.click()
    page.get_by_role("option", name=re.compile(re.escape(option_text))).first.click()


def fill_in_a_tiny_run(page, main, data) -> None:
    """The form: the dataset and a fast run (MobileNet α=0.25 at 32 px from random weights, 2 epochs)."""
    field(main, "Dataset folder").fill(str(data))
    choose(page, main, "Backbone", "MobileNet —")
    choose(page, main, "Width (alpha)", "0.25")
    field(main, "Image size (px)").fill("32")
    main.get_by_test_id("stRadio").filter(has_text="Starting weights").get_by_text("none", exact=True).click()
    field(main, "Epochs").fill("2")
    field(main, "Batch size").fill("8")


def test_a_sweep_started_on_the_train_page_leads_to_compare_with_the_verdict_and_the_images(runs_dir, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from engine.config import RunConfig
    from engine.sweeps import list_sweeps, wait_for_sweep

    data = make_dataset(tmp_path / "appdata" / "colours", classes=("cats", "dogs"), per_class=12)
    environment = {"TRANSFER_STUDIO_RUNS": str(runs_dir), "TRANSFER_STUDIO_DATA": str(tmp_path / "appdata"),
                   "TRANSFER_STUDIO_OFFLINE": "1"}
    with serve_dashboard(tmp_path / "streamlit.log", environment) as url, sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
        page.goto(f"{url}/train")
        page.get_by_role("heading", name="Train", exact=True).wait_for(timeout=60000)
        main = page.get_by_test_id("stMainBlockContainer")

        # The form first, then the Sweep section: typing there reruns the page, and the form keeps
        # what was typed into it until one of its buttons sends it.
        fill_in_a_tiny_run(page, main, data)
        main.get_by_text("Sweep: several runs that differ in a few settings").click()
        field(main, "Learning rates").fill("0.0001, 0.01")
        field(main, "Learning rates").press("Enter")
        expect(main.get_by_text("2 runs:")).to_be_visible(timeout=30000)
        field(main, "Sweep name").fill("colour sweep")
        field(main, "Sweep name").press("Enter")
        start = main.get_by_role("button", name="Start sweep (2 runs)")
        expect(start).to_be_enabled(timeout=30000)
        expect(field(main, "Epochs")).to_have_value("2")  # still there after the Sweep section's reruns
        screenshot_whole_page(page, tmp_path / "train-sweep.png")
        start.click()

        page.get_by_role("heading", name="Sweeps", exact=True).wait_for(timeout=60000)
        [sweep] = list_sweeps(runs_dir)
        assert f"sweep={sweep['id']}" in page.url
        configs = [RunConfig.load(runs_dir / entry["run_id"] / "config.json") for entry in sweep["runs"]]
        assert sorted(config.training.learning_rate for config in configs) == [0.0001, 0.01]
        assert {(config.data.path, config.model.backbone, config.model.alpha, config.model.weights,
                 config.model.image_size, config.training.epochs) for config in configs} == {
            (str(data), "MobileNet", 0.25, "none", 32, 2)}

        # The runs go through the real queue. The Sweeps page does not refresh itself, so, once
        # both have finished, it is opened again (as a user reloads it) and shows the winner.
        statuses = wait_for_sweep(sweep, runs_dir, timeout=300)
        assert [status.state.value for status in statuses] == ["finished"] * 2, [status.message for status in statuses]
        page.reload()
        expect(main.get_by_text("Best on validation:")).to_be_visible(timeout=60000)
        # The grid draws on a canvas; its accessible cells carry the values once it has drawn.
        grid_cells = main.get_by_test_id("stDataFrame").locator("td, [role=gridcell]")
        grid_cells.first.wait_for(state="attached", timeout=30000)
        cells = grid_cells.all_inner_texts()
        assert {"colour sweep · learning_rate=0.0001", "colour sweep · learning_rate=0.01"} <= set(cells), cells
        assert cells.count("finished") == 2, cells
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
        for entry in sweep["runs"]:
            assert entry["run_id"] in page.url  # both runs are in the address: a link reopens the comparison
        screenshot_whole_page(page, tmp_path / "compare.png")
        browser.close()
    assert all((tmp_path / name).stat().st_size > 10_000 for name in ("train-sweep.png", "sweeps.png", "compare.png"))
