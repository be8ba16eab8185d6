"""Demo mode in a real headless Chromium (Debian's package) driven by Playwright.

Trains a tiny three-colour run, serves the dashboard on a free local port, opens the share
link (`/demo?run=<id>`), classifies an example picture, sees the bars and the answer, turns on
"Show where the model looked", finds the share link and its QR code, and takes a photo with
Chromium's synthetic camera. Screenshots go to
the test's temporary folder (`demo-1-answer.png`, `demo-2-overlay.png`, `demo-3-camera.png`).
"""

import re

import pytest

from tests.conftest import launch_chromium, make_dataset, screenshot_whole_page, serve_dashboard, tiny_config

pytestmark = [pytest.mark.browser, pytest.mark.training]


@pytest.fixture
def demo_server(tmp_path):
    """A tiny trained run named "Colour guesser", and the dashboard serving its runs folder on a free port."""
    import engine

    runs = tmp_path / "runs"
    environment = {"TRANSFER_STUDIO_RUNS": str(runs), "TRANSFER_STUDIO_DATA": str(tmp_path / "appdata"),
                   "TRANSFER_STUDIO_OFFLINE": "1"}
    data = make_dataset(tmp_path / "colours", classes=("birds", "cats", "dogs"), per_class=8, size=(64, 48))
    # 96 px, so the last feature map has more than one cell for Grad-CAM to tell apart.
    config = tiny_config(data, name="Colour guesser", **{"data.cache": "memory", "model.image_size": 96,
                                                          "training.epochs": 10})
    run_dir = engine.train_run(config, runs)
    assert engine.read_status(run_dir).state is engine.State.FINISHED
    with serve_dashboard(tmp_path / "streamlit.log", environment) as url:
        yield url, run_dir


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # A synthetic camera (Chromium's test pattern), allowed without asking.
        browser = launch_chromium(playwright, ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
        context = browser.new_context(viewport={"width": 1366, "height": 900}, permissions=["camera"])
        yield context.new_page()
        browser.close()


def test_demo_mode_classifies_an_example_and_shows_where_the_model_looked(demo_server, page, tmp_path):
    from playwright.sync_api import expect

    url, run_dir = demo_server
    page.goto(f"{url}/demo?run={run_dir.name}")
    page.get_by_role("heading", name="Demo", exact=True).wait_for(timeout=60000)
    expect(page.get_by_role("combobox", name="Model")).to_have_value("Colour guesser", timeout=30000)
    expect(page.get_by_text("Take a photo or choose an example picture")).to_be_visible(timeout=30000)

    page.get_by_role("button", name="Try this one").first.click()
    answer = page.get_by_role("heading", name=re.compile(r"^(This looks like|Not sure)"))
    expect(answer).to_be_visible(timeout=60000)
    bars = page.locator(".demo-bar")
    expect(bars).to_have_count(3, timeout=30000)
    percentages = [re.search(r"(\d+)%", text) for text in bars.all_inner_texts()]
    assert all(percentages), bars.all_inner_texts()
    assert sum(int(found.group(1)) for found in percentages) in range(97, 104)  # rounded shares of one whole
    assert page.url.endswith(f"/demo?run={run_dir.name}")  # the address still names the run
    screenshot_whole_page(page, tmp_path / "demo-1-answer.png")

    sources_before = [image.get_attribute("src") for image in page.locator("[data-testid='stImage'] img").all()]
    page.get_by_text("Show where the model looked").click()
    expect(page.get_by_text("counted most for")).to_be_visible(timeout=60000)
    screenshot_whole_page(page, tmp_path / "demo-2-overlay.png")
    sources_after = [image.get_attribute("src") for image in page.locator("[data-testid='stImage'] img").all()]
    # The overlay takes the photo's place: one picture changed, the gallery and the QR code did not.
    assert len(sources_after) == len(sources_before)
    assert sum(before != after for before, after in zip(sources_before, sources_after)) == 1

    expect(page.get_by_text("Share this demo")).to_be_visible()
    expect(page.locator("[data-testid='stCode']")).to_contain_text(f"/demo?run={run_dir.name}")
    expect(page.get_by_text("Scan to open this demo")).to_be_visible()

    # The camera tile: a photo taken replaces the example as the picture the model answers for.
    page.get_by_role("button", name="Take Photo").click()
    expect(page.get_by_text("This example comes from")).to_have_count(0, timeout=60000)
    expect(answer).to_be_visible(timeout=60000)
    expect(bars).to_have_count(3, timeout=30000)
    screenshot_whole_page(page, tmp_path / "demo-3-camera.png")
    for name in ("demo-1-answer.png", "demo-2-overlay.png", "demo-3-camera.png"):
        assert (tmp_path / name).stat().st_size > 10_000
