"""The accessibility audit: axe-core in a real headless Chromium on every page, in each state the tests reach.

axe-core comes from npm (`node_modules/axe-core`, pinned in package.json and installed by
`make browser-runtime`), never from a CDN. It runs the WCAG 2.0/2.1 A and AA rules on each page
once Streamlit has drawn it; a serious or critical violation fails the test, with each
finding's rule, impact, elements and help text in the message. The only findings let through
are Streamlit's own ones that the app cannot fix (`STREAMLIT_FINDINGS`), each by rule and
selector, with its upstream issue; docs/accessibility.md lists them.

One server serves one runs folder: first empty (every page without runs), then with two tiny
finished runs (Evaluate with a confusion-matrix cell chosen, Compare, Predict with a prediction
shown, Demo with an answer, Export, and three pages in the dark theme). The keyboard-only test
then chooses the built-in sample, starts a run (Monitor is audited while it runs), opens
Evaluate, chooses a confusion-matrix cell and predicts an image with Tab, arrows, Enter and
Space (and typing into fields), checking at every key that the focus can be seen.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO_ROOT, launch_chromium, make_dataset, serve_dashboard, stop_live_workers, tiny_config

pytestmark = [pytest.mark.browser, pytest.mark.training]

AXE_SCRIPT = REPO_ROOT / "node_modules" / "axe-core" / "axe.min.js"
# WCAG 2.1 AA is what organisations ask for: the A and AA rules of WCAG 2.0 and 2.1.
WCAG_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
BLOCKING_IMPACTS = ("serious", "critical")
# Streamlit's own findings that the app cannot fix: {rule id: [CSS selectors of the elements]}.
# A finding is let through only when its rule is listed here and its element matches (or sits
# inside) one of the rule's selectors; every other element is still checked by that rule.
STREAMLIT_FINDINGS: dict[str, list[str]] = {}

PAGES = {"Home": "", "Data": "data", "Train": "train", "Monitor": "monitor", "Evaluate": "evaluate",
         "Compare": "compare", "Sweeps": "sweeps", "Predict": "predict", "Demo": "demo", "Export": "export"}
HEADINGS = {"Home": "Transfer Studio"}


# True once Streamlit has been idle for 0.6 s (its running indicator can blink off between
# messages), no placeholder is left and every image has loaded.
DRAWN = """() => {
    const now = performance.now();
    if (document.querySelector('[data-testid="stStatusWidget"]')
            || document.querySelector('[data-testid="stSkeleton"]')
            || Array.from(document.images).some(image => !image.complete)) {
        window.__lastBusy = now;
        return false;
    }
    return now - (window.__lastBusy || 0) > 600;
}"""


def wait_until_drawn(page, title: str) -> None:
    """Waits for a page's heading, then for Streamlit to finish: idle for 0.6 s, every image loaded."""
    page.get_by_role("heading", name=HEADINGS.get(title, title), exact=True).wait_for(timeout=60000)
    page.evaluate("window.__lastBusy = performance.now()")
    page.wait_for_function(DRAWN, timeout=90000, polling=100)


def audit(page, where: str) -> list[dict]:
    """axe-core's WCAG A/AA violations on the page as it is now, less the listed Streamlit findings.

    Returns one dict per violation: where, rule, impact, help, and the target selectors of its elements.
    """
    if not page.evaluate("typeof window.axe !== 'undefined'"):
        page.add_script_tag(path=str(AXE_SCRIPT))
    return page.evaluate(
        """async ([tags, allowed, where]) => {
            const results = await axe.run(document, {runOnly: {type: 'tag', values: tags}, elementRef: true});
            const isAllowed = (rule, element) => (allowed[rule] || []).some(
                selector => element && element.closest && element.closest(selector));
            return results.violations.map(violation => ({
                where, rule: violation.id, impact: violation.impact, help: violation.help,
                targets: violation.nodes.filter(node => !isAllowed(violation.id, node.element))
                                        .map(node => node.target.join(' ').split(' > ').slice(-2).join(' > ') + ' «' + (node.element.innerText || '').slice(0, 60) + '» — ' + (node.failureSummary || '')
                                                     .split('\\n').slice(1, 2).join('').trim()),
            })).filter(violation => violation.targets.length);
        }""",
        [WCAG_TAGS, STREAMLIT_FINDINGS, where])


def blocking(findings: list[dict]) -> list[dict]:
    """The findings that fail the audit: serious or critical ones."""
    return [finding for finding in findings if finding["impact"] in BLOCKING_IMPACTS]


def describe(findings: list[dict]) -> str:
    """One paragraph per finding: where, rule, impact, help, and up to five of its elements."""
    lines = []
    for finding in findings:
        lines.append(f"{finding['where']}: {finding['rule']} ({finding['impact']}, {len(finding['targets'])} "
                     f"element(s)) — {finding['help']}")
        lines += [f"    {target}" for target in finding["targets"][:5]]
        if len(finding["targets"]) > 5:
            lines.append(f"    … and {len(finding['targets']) - 5} more")
    return "\n".join(lines)


def visit(page, url: str, title: str, query: str = "") -> None:
    """Opens a page by its address (a new session) and waits for it to be drawn."""
    page.goto(f"{url}/{PAGES[title]}{query}")
    if title == "Data":
        # The first visit shows the built-in digits sample: its thumbnails are what needs alt text.
        page.locator("[data-testid='stImage'] img").first.wait_for(timeout=90000)
    wait_until_drawn(page, title)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory):
    """The dashboard on a free port over an empty runs folder (filled later by `runs`), and its folders."""
    if not AXE_SCRIPT.is_file():
        pytest.fail(f"{AXE_SCRIPT} is missing: `make browser-runtime` installs axe-core from npm")
    base = tmp_path_factory.mktemp("accessibility")
    environment = {"TRANSFER_STUDIO_RUNS": str(base / "runs"), "TRANSFER_STUDIO_DATA": str(base / "appdata"),
                   "TRANSFER_STUDIO_CACHE": str(base / "cache"), "TRANSFER_STUDIO_OFFLINE": "1"}
    (base / "appdata").mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        try:
            with serve_dashboard(base / "streamlit.log", environment) as url:
                yield url, base
        finally:
            stop_live_workers(base / "runs")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the whole module."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def browser_page(browser):
    """One page in the light theme (the system setting a fresh browser reports)."""
    return browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="light").new_page()


@pytest.fixture(scope="module")
def runs(dashboard):
    """Two tiny finished runs in the served folder; returns (their ids, the dataset folder).

    A running run is audited by the keyboard test, on the run it starts.
    """
    import engine

    _, base = dashboard
    root = base / "runs"
    data = make_dataset(base / "colours", classes=("birds", "cats", "dogs"), per_class=8)
    finished = []
    for name, learning_rate in (("Colour guesser", 0.01), ("Colour guesser, slower", 0.003)):
        config = tiny_config(data, name=name, **{"data.cache": "memory", "training.learning_rate": learning_rate})
        run_dir = engine.train_run(config, root)
        assert engine.read_status(run_dir).state is engine.State.FINISHED
        finished.append(run_dir.name)
    return finished, data


def test_every_page_without_runs_has_no_serious_finding(dashboard, browser_page):
    url, _ = dashboard
    findings = []
    for title in PAGES:
        visit(browser_page, url, title)
        findings += audit(browser_page, f"{title} (no runs)")
    print(describe(findings))  # every finding, moderate and minor too, for `pytest -s`
    assert not blocking(findings), "\n" + describe(blocking(findings))


def test_every_page_with_runs_has_no_serious_finding(dashboard, browser_page, runs):
    url, _ = dashboard
    finished, data = runs
    page = browser_page
    findings = []
    for title in ("Home", "Data", "Train", "Sweeps", "Export"):
        visit(page, url, title, f"?run={finished[0]}")
        findings += audit(page, f"{title} (finished runs)")
    visit(page, url, "Monitor", f"?run={finished[0]}")
    findings += audit(page, "Monitor (a finished run)")
    visit(page, url, "Compare")
    findings += audit(page, "Compare (two runs)")

    visit(page, url, "Evaluate", f"?run={finished[0]}")
    choose_a_confusion_cell(page)
    findings += audit(page, "Evaluate (a confusion-matrix cell chosen)")

    visit(page, url, "Predict", f"?run={finished[0]}")
    page.locator("input[type='file']").first.set_input_files(str(next((data / "cats").glob("*.png"))))
    page.get_by_role("heading", name=re.compile(r"— \d+%|^Not sure")).wait_for(timeout=60000)
    wait_until_drawn(page, "Predict")
    findings += audit(page, "Predict (a prediction shown)")

    visit(page, url, "Demo", f"?run={finished[0]}")
    page.get_by_role("button", name="Try this one").first.click()
    page.get_by_role("heading", name=re.compile(r"^(This looks like|Not sure)")).wait_for(timeout=60000)
    wait_until_drawn(page, "Demo")
    findings += audit(page, "Demo (an answer shown)")
    print(describe(findings))  # every finding, moderate and minor too, for `pytest -s`
    assert not blocking(findings), "\n" + describe(blocking(findings))


def choose_a_confusion_cell(page) -> None:
    """Clicks the matrix's top-left cell (as a mouse user would) and waits for its images."""
    chart = page.locator(".st-key-confusion [data-testid='stPlotlyChart']").first
    chart.scroll_into_view_if_needed()
    page.wait_for_timeout(800)
    area = chart.locator(".nsewdrag").first.bounding_box()
    classes = 3
    centre = (area["x"] + area["width"] * 0.5 / classes, area["y"] + area["height"] * 0.5 / classes)
    page.mouse.move(*centre)  # Plotly reports a click on the point it is hovering
    page.wait_for_timeout(400)
    page.mouse.click(*centre)
    page.get_by_text("True birds, answered birds").wait_for(timeout=30000)
    wait_until_drawn(page, "Evaluate")


def test_pages_in_the_dark_theme_have_no_serious_finding(dashboard, browser, runs):
    """The dark theme's contrast: a browser whose system setting is dark gets the app's dark theme."""
    url, _ = dashboard
    finished, _ = runs
    page = browser.new_context(viewport={"width": 1280, "height": 900}, color_scheme="dark").new_page()
    findings = []
    # The pages with the most kinds of text: captions with code, alerts, metrics, tables and charts.
    for title in ("Data", "Monitor", "Evaluate"):
        visit(page, url, title, f"?run={finished[0]}")
        background = page.evaluate("getComputedStyle(document.querySelector('.stApp')).backgroundColor")
        assert sum(int(value) for value in re.findall(r"\d+", background)[:3]) < 150, background
        findings += audit(page, f"{title} (dark theme)")
    page.context.close()
    print(describe(findings))  # every finding, moderate and minor too, for `pytest -s`
    assert not blocking(findings), "\n" + describe(blocking(findings))


# True when the focused element shows where it is: an outline or a shadow ring on it or on one of the
# few wrappers Base Web draws its fields with, or their border in the theme's primary colour.
FOCUS_SHOWN = """() => {
    const focused = document.activeElement;
    if (!focused || focused === document.body) return 'nothing is focused';
    let node = focused;
    for (let depth = 0; node && depth < 5; depth++, node = node.parentElement) {
        const style = getComputedStyle(node);
        if (style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0) return '';
        if (style.boxShadow && style.boxShadow !== 'none') return '';
        if (style.borderTopColor === 'rgb(27, 110, 194)' || style.borderBottomColor === 'rgb(27, 110, 194)') return '';
    }
    const label = focused.getAttribute('aria-label') || focused.innerText || focused.value || '';
    return `${focused.tagName.toLowerCase()} "${label.slice(0, 40)}" has no visible focus`;
}"""


def focus_problem(page) -> str:
    """"" when the focus is visible within a second (Base Web fades its border in), else what is wrong."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => !({FOCUS_SHOWN})()", timeout=1000, polling=50)
        return ""
    except PlaywrightTimeout:
        return page.evaluate(FOCUS_SHOWN)


def press(page, key: str) -> None:
    """Presses one key and checks that the focus, wherever it went, can be seen.

    Enter and Space may rerun the page or open another: the check then waits for it to be drawn,
    and a focus that went back to the page itself (the next Tab starts from the top) is accepted.
    """
    before = page.evaluate("(document.activeElement?.outerHTML || '').slice(0, 160)")
    page.keyboard.press(key)
    problem = focus_problem(page)
    if problem and key in ("Enter", "Space"):
        page.evaluate("window.__lastBusy = performance.now()")
        page.wait_for_function(DRAWN, timeout=90000, polling=100)
        problem = focus_problem(page).replace("nothing is focused", "")
    if problem == "nothing is focused" and key == "Tab":
        # Past the page's last element the focus leaves for the browser's own controls once; the
        # next Tab must bring it back to the top of the page (Streamlit's "Skip to main content").
        page.keyboard.press("Tab")
        problem = focus_problem(page) or ("" if page.evaluate(
            "document.activeElement?.dataset?.testid === 'stSkipToContent'") else "the focus did not come back")
    assert not problem, f"after {key} (from {before}): {problem}"


def tab_to(page, target, limit: int = 250) -> None:
    """Presses Tab until `target` (a locator) holds the focus, checking the focus is visible at every stop."""
    target.wait_for(timeout=60000)
    for _ in range(limit):
        press(page, "Tab")
        if target.evaluate("element => element === document.activeElement || element.contains(document.activeElement)"):
            return
    raise AssertionError(f"{limit} presses of Tab never reached {target}")


def sidebar_link(page, title: str):
    """The page's link in the sidebar (its text ends with the title; the icon's ligature comes first)."""
    return page.locator("[data-testid='stSidebarNav'] a").filter(has_text=re.compile(f"{title}$")).first


def go_by_keyboard(page, title: str) -> None:
    """Tabs to the page's link in the sidebar and presses Enter."""
    tab_to(page, sidebar_link(page, title))
    press(page, "Enter")
    wait_until_drawn(page, title)


def type_into(page, label: str, text: str) -> None:
    """Tabs to a number or text field and replaces what it holds by typing."""
    tab_to(page, page.locator(f"input[aria-label='{label}']").first)
    page.keyboard.press("Control+A")
    page.keyboard.type(text)


def test_a_keyboard_user_trains_explores_and_predicts(dashboard, browser):
    """The whole flow with Tab, arrows, Enter and Space (and typing into fields), the focus always visible."""
    url, base = dashboard
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(url)
    wait_until_drawn(page, "Home")

    go_by_keyboard(page, "Data")
    tab_to(page, page.get_by_role("button", name="Use this sample"))
    press(page, "Space")
    page.get_by_text("Usable images").wait_for(timeout=60000)
    wait_until_drawn(page, "Data")
    tab_to(page, page.get_by_role("button", name=re.compile("^Train on this data")))
    press(page, "Enter")
    wait_until_drawn(page, "Train")

    # A small share of the digits at a small size, so the run takes seconds.
    type_into(page, "Use this share of the data", "0.1")
    type_into(page, "Image size (px)", "64")
    type_into(page, "Epochs", "2")
    tab_to(page, page.get_by_role("button", name="Start training"))
    press(page, "Enter")
    page.get_by_role("heading", name="Monitor", exact=True).wait_for(timeout=60000)
    # The audit of a running run: its worker is still starting TensorFlow for several seconds.
    page.get_by_test_id("stAlertContentInfo").get_by_text("RUNNING").wait_for(timeout=60000)
    wait_until_drawn(page, "Monitor")
    findings = blocking(audit(page, "Monitor (a running run)"))
    assert not findings, "\n" + describe(findings)
    page.get_by_test_id("stAlertContentSuccess").get_by_text("FINISHED").wait_for(timeout=240000)
    wait_until_drawn(page, "Monitor")

    go_by_keyboard(page, "Evaluate")
    true_class = page.get_by_role("combobox", name="True class")
    tab_to(page, true_class)
    before = page.get_by_text(re.compile(r"^True \S+, answered \S+$")).inner_text()
    press(page, "ArrowDown")  # opens the list on the current class
    press(page, "ArrowDown")
    press(page, "Enter")
    wait_until_drawn(page, "Evaluate")
    after = page.get_by_text(re.compile(r"^True \S+, answered \S+$")).inner_text()
    assert after != before, f"the keyboard did not choose another cell: still {after!r}"

    go_by_keyboard(page, "Predict")
    sample = next((base / "appdata").rglob("*.png"))
    tab_to(page, page.get_by_test_id("stFileUploaderDropzone").locator("button"))
    with page.expect_file_chooser() as chooser:
        press(page, "Enter")
    chooser.value.set_files(str(sample))
    page.get_by_role("heading", name=re.compile(r"— \d+%|^Not sure")).wait_for(timeout=60000)
    page.context.close()
