"""The Export page in a real headless Chromium (Debian's package) driven by Playwright.

Trains a tiny run, serves the dashboard on a free local port, exports the model as ONNX from the
page, reads the parity table the page draws, downloads the zip through the browser and checks
what is in it. The screenshot (`export.png`, the one in docs/images) goes to the test's
temporary folder.
"""

import json
import re
import zipfile

import pytest

from tests.conftest import launch_chromium, make_dataset, screenshot_whole_page, serve_dashboard, tiny_config

pytestmark = [pytest.mark.browser, pytest.mark.training]


@pytest.fixture
def export_server(tmp_path):
    """A tiny trained run and the dashboard serving its runs folder."""
    import engine

    runs = tmp_path / "runs"
    data = make_dataset(tmp_path / "colours", classes=("cats", "dogs"), per_class=12)
    run_dir = engine.train_run(tiny_config(data, name="Colour guesser", **{"data.cache": "memory",
                                                                            "model.image_size": 64}), runs)
    assert engine.read_status(run_dir).state is engine.State.FINISHED
    environment = {"TRANSFER_STUDIO_RUNS": str(runs), "TRANSFER_STUDIO_DATA": str(tmp_path / "appdata"),
                   "TRANSFER_STUDIO_OFFLINE": "1"}
    with serve_dashboard(tmp_path / "streamlit.log", environment) as url:
        yield url, run_dir


def test_a_person_exports_onnx_sees_the_parity_check_and_downloads_the_zip(export_server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, run_dir = export_server
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True).new_page()
        page.goto(f"{url}/export")
        page.get_by_role("heading", name="Export", exact=True).wait_for(timeout=60000)
        main = page.get_by_test_id("stMainBlockContainer")
        expect(main.get_by_text("No exports yet.")).to_be_visible(timeout=30000)

        main.locator(".st-key-export_choice [data-testid='stSelectbox']").click()
        page.get_by_role("option", name=re.compile(r"^ONNX \(onnxruntime")).first.click()
        main.get_by_role("button", name="Export and check").click()
        expect(main.get_by_text("ONNX (onnxruntime, many languages): passed")).to_be_visible(timeout=240000)

        # The parity table and the download the page offers for the export that passed.
        expect(main.get_by_role("heading", name="The parity check")).to_be_visible()
        table = main.get_by_test_id("stDataFrame")
        expect(table).to_be_visible()
        # The grid draws on a canvas; its accessible cells carry the same values, in column order,
        # once it has drawn (reading them earlier gives an empty list).
        grid_cells = table.locator("td, [role=gridcell]")
        grid_cells.first.wait_for(state="attached", timeout=30000)
        expect(grid_cells.nth(4)).to_be_attached()
        cells = grid_cells.all_inner_texts()
        download_button = main.get_by_role("button", name="onnx (zip)")
        expect(download_button).to_be_visible()
        screenshot_whole_page(page, tmp_path / "export.png")

        with page.expect_download(timeout=60000) as download_info:
            download_button.click()
        download = download_info.value
        assert download.suggested_filename == f"{run_dir.name}-onnx.zip"
        saved = tmp_path / download.suggested_filename
        download.save_as(saved)
        browser.close()

    with zipfile.ZipFile(saved) as archive:
        names = set(archive.namelist())
        assert {"onnx/model.onnx", "onnx/labels.json", "onnx/input_spec.json", "onnx/README.md",
                "onnx/parity.json"} <= names, names
        parity = json.loads(archive.read("onnx/parity.json"))
    # What the browser handed over is the export the engine checked.
    assert parity["passed"] is True and parity["format"] == "onnx"
    assert parity == json.loads((run_dir / "exports" / "onnx" / "parity.json").read_text())
    # The table row the person saw: export, passed, images compared, same answer.
    assert cells[:3] == ["onnx", "yes", str(parity["images"])], cells
    assert float(cells[4]) == parity["top1_agreement"], cells
    assert (tmp_path / "export.png").stat().st_size > 10_000
