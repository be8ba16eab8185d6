"""Sign-in: local mode without `[auth]`, and Streamlit's OpenID Connect sign-in with it.

The AppTest tests give `st.user` claims directly. The browser tests sign real users in
through a real OpenID Connect provider on localhost (oidc-provider-mock, whose login form
takes any subject), with the app served by `streamlit run` and driven in Debian's Chromium;
the team test has a member train on the digits sample while another member, an admin and a
viewer each see what their role lets them do, and the engine refuses what it must.
Screenshots go to test-artifacts/screenshots/signin-*.png.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import CHROMIUM, REPO_ROOT, free_port, launch_chromium, stop_live_workers, tiny_config, wait_until

SCREENSHOTS = REPO_ROOT / "test-artifacts" / "screenshots"
COOKIE_SECRET = "a-test-cookie-secret-of-enough-length-0123456789"
USER_COOKIE = "_streamlit_user"


def auth_section(app_url: str, provider_url: str) -> dict:
    """The `[auth]` table of secrets.toml for a provider and an app at these addresses."""
    return {"redirect_uri": f"{app_url}/oauth2callback", "cookie_secret": COOKIE_SECRET,
            "client_id": "transfer-studio", "client_secret": "test-client-secret",
            "server_metadata_url": f"{provider_url}/.well-known/openid-configuration"}


def open_app(secrets: dict | None = None, user: dict | None = None):
    """A fresh AppTest session of the dashboard with these secrets and `st.user` claims, run once."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(REPO_ROOT / "streamlit_app.py"), default_timeout=60)
    for key, value in (secrets or {}).items():
        app.secrets[key] = value
    # AppTest's default user has an e-mail but no `is_logged_in`: a signed-out visitor.
    app.user = user if user is not None else {}
    return app.run()


ALICE = {"is_logged_in": True, "iss": "https://idp.example", "sub": "alice-1", "name": "Alice Example",
         "email": "alice@example.com", "email_verified": True}
AUTH = auth_section("http://localhost:8501", "https://idp.example")


def sidebar_text(app) -> list[str]:
    return [element.value for element in [*app.sidebar.markdown, *app.sidebar.caption]]


@pytest.fixture
def secrets_from(monkeypatch):
    """Points `st.secrets` at one file for code run outside a script (restored afterwards)."""
    import streamlit
    from streamlit import config
    from streamlit.runtime.secrets import Secrets

    original = config.get_option("secrets.files")

    def use(path: Path) -> None:
        monkeypatch.setattr(streamlit, "secrets", Secrets())
        config.set_option("secrets.files", [str(path)])

    yield use
    config.set_option("secrets.files", original)


def test_local_mode_is_unchanged_and_the_user_is_the_system_user(app_environment, secrets_from, tmp_path):
    import signin
    from engine.users import local_user

    app = open_app()
    assert not app.exception
    assert [title.value for title in app.title] == ["Transfer Studio"]
    # No sign-in screen, no user box, no sign-out button: local mode looks as it always did.
    assert not [button for button in app.button if button.label in ("Sign in", "Sign out")]
    assert sidebar_text(app) == []
    secrets_from(tmp_path / "absent.toml")
    assert signin.signed_in_mode() is False
    assert signin.current_user() == local_user()


def test_signed_out_visitor_sees_only_the_sign_in_screen(app_environment):
    app = open_app({"auth": AUTH})
    assert not app.exception
    assert [button.label for button in app.button] == ["Sign in"]
    # Nothing of the pages ran: no forms, no pickers, no run tables.
    assert not app.selectbox and not app.dataframe and not app.text_input
    assert sidebar_text(app) == []


def test_signed_in_user_is_named_in_the_sidebar_with_their_role(app_environment):
    issuer_and_subject = "https://idp.example|bob-7"
    secrets = {"auth": AUTH, "admins": ["Alice@Example.com"], "viewers": [issuer_and_subject]}

    alice = open_app(secrets, ALICE)
    assert not alice.exception
    assert sidebar_text(alice) == [":material/account_circle: **Alice Example**", "alice@example\\.com · admin"]
    assert [button.label for button in alice.sidebar.button] == ["Sign out"]

    bob = open_app(secrets, {"is_logged_in": True, "iss": "https://idp.example", "sub": "bob-7", "name": "Bob"})
    assert sidebar_text(bob) == [":material/account_circle: **Bob**", "viewer · read only"]

    # Same e-mail as Alice, but not verified: an e-mail anybody could type grants no role.
    mallory = open_app(secrets, {**ALICE, "sub": "mallory", "name": "Mallory", "email_verified": False})
    assert sidebar_text(mallory)[1] == "alice@example\\.com · member"


def test_a_name_with_markdown_is_shown_as_typed(app_environment):
    app = open_app({"auth": AUTH}, {**ALICE, "name": "[click](http://evil) :red[x] $y$"})
    assert sidebar_text(app)[0] == (":material/account_circle: "
                                    "**\\[click\\]\\(http\\://evil\\) \\:red\\[x\\] \\$y\\$**")


def test_a_token_without_issuer_or_subject_is_refused(app_environment):
    app = open_app({"auth": AUTH}, {"is_logged_in": True, "name": "Somebody", "email": "somebody@example.com"})
    assert "no issuer (`iss`) or subject (`sub`)" in app.error[0].value
    assert [button.label for button in app.button] == ["Sign out"]
    assert not app.selectbox and sidebar_text(app) == []


def test_malformed_access_lists_stop_the_dashboard(app_environment):
    app = open_app({"auth": AUTH, "admins": "alice@example.com", "viewers": [1, 2]}, ALICE)
    assert "`viewers` in secrets.toml must be a list" in app.error[0].value
    assert not app.selectbox and sidebar_text(app) == []


def test_an_unreadable_secrets_file_never_falls_back_to_local_mode(tmp_path, secrets_from):
    import signin

    broken = tmp_path / "broken.toml"
    broken.write_text('[auth]\nredirect_uri = "http://localhost:8501/oauth2callback\n')
    secrets_from(broken)
    with pytest.raises(signin.SignInError, match="secrets file cannot be read"):
        signin.signed_in_mode()
    not_a_table = tmp_path / "not_a_table.toml"
    not_a_table.write_text('auth = "yes"\n')
    secrets_from(not_a_table)
    with pytest.raises(signin.SignInError, match="must be a table"):
        signin.signed_in_mode()
    with pytest.raises(signin.SignInError, match="must be a table"):
        signin.current_user()


def test_sign_in_fails_closed_when_its_secrets_go_missing(app_environment, secrets_from, tmp_path, monkeypatch):
    """A server that has seen [auth], or is told sign-in is required, never becomes local mode."""
    import signin

    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[auth]\nredirect_uri = "http://localhost:8501/oauth2callback"\ncookie_secret = "x"\n')
    secrets_from(secrets)
    assert signin.signed_in_mode() is True
    secrets_from(tmp_path / "gone.toml")  # deleted while being edited, or forgotten by a redeploy
    with pytest.raises(signin.SignInError, match="secrets file with its \\[auth\\] section cannot be found"):
        signin.current_user()
    app = open_app()  # a visitor now: the problem page, no page of the app, no local admin
    assert not app.exception and any("cannot be found" in error.value for error in app.error)
    assert not app.selectbox and not [title for title in app.title if title.value != "Transfer Studio"]

    signin._auth_seen.clear()  # a fresh server process, told by its operator that sign-in is required
    monkeypatch.setenv(signin.REQUIRE_SIGNIN_VARIABLE, "1")
    with pytest.raises(signin.SignInError, match="Sign-in is required on this server"):
        signin.signed_in_mode()


# ---------------------------------------------------------------------------------------
# In a real browser, against a real OpenID Connect provider.

HOST = "127.0.0.1"  # the one host name for the browser, the app, the redirect URI and the provider



def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    """Waits until `url` answers 200, or fails with the end of the process's log."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"{url} did not answer: " + log.read_text()[-2000:])


def start_process(arguments: list[str], log: Path, environment: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(arguments, cwd=REPO_ROOT, env=environment or dict(os.environ),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def stop_process(process: subprocess.Popen) -> None:
    """Stops one process this test started, by its id."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=20)


@pytest.fixture
def provider(tmp_path):
    """oidc-provider-mock in its own process on a free local port; yields its address."""
    port = free_port()
    log = tmp_path / "provider.log"
    process = start_process([sys.executable, "-m", "oidc_provider_mock", "--host", HOST, "--port", str(port)], log)
    url = f"http://{HOST}:{port}"
    try:
        wait_for_http(f"{url}/.well-known/openid-configuration", process, log)
        yield url
    finally:
        stop_process(process)


def set_provider_user(provider_url: str, subject: str, claims: dict) -> None:
    """Tells the provider which claims to put in `subject`'s ID token."""
    request = urllib.request.Request(f"{provider_url}/users/{quote(subject, safe='')}", method="PUT",
                                     data=json.dumps(claims).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 204


@contextlib.contextmanager
def serve_app(tmp_path: Path, provider_url: str, admins: list[str], viewers: list[str],
              environment: dict | None = None):
    """Serves the dashboard with `streamlit run`, `[auth]` pointing at the provider; yields its address.

    Its secrets file is a temporary one (tmp_path/secrets.toml) passed with `--secrets.files`,
    so nothing is written into the repository's .streamlit/. Runs go to tmp_path/runs.
    """
    port = free_port()
    app_url = f"http://{HOST}:{port}"
    data_dir = tmp_path / "appdata"
    data_dir.mkdir(exist_ok=True)
    auth = auth_section(app_url, provider_url)
    secrets = tmp_path / "secrets.toml"
    # Top-level keys come before the [auth] table in TOML.
    secrets.write_text(f"admins = {json.dumps(admins)}\nviewers = {json.dumps(viewers)}\n\n[auth]\n"
                       + "".join(f'{key} = "{value}"\n' for key, value in auth.items()))
    environment = {**os.environ, "TRANSFER_STUDIO_RUNS": str(tmp_path / "runs"),
                   "TRANSFER_STUDIO_DATA": str(data_dir), "TRANSFER_STUDIO_OFFLINE": "1", **(environment or {})}
    log = tmp_path / "streamlit.log"
    process = start_process(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", HOST, "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--secrets.files", str(secrets)],
        log, environment)
    try:
        wait_for_http(f"{app_url}/_stcore/health", process, log)
        yield app_url
    finally:
        stop_process(process)


@pytest.fixture
def signed_in_app(tmp_path, provider):
    """The dashboard behind the provider's sign-in: Alice (by verified e-mail) is an admin and
    Bob (by issuer and subject) a viewer. One queued run exists, so a leak of the Home page would show.
    """
    from engine.runs import create_run

    data_dir = tmp_path / "appdata"
    data_dir.mkdir()
    run_dir = create_run(tiny_config(data_dir), runs_dir=tmp_path / "runs")
    with serve_app(tmp_path, provider, admins=["alice@example.com"], viewers=[f"{provider}|bob-2"]) as app_url:
        yield app_url, run_dir.name


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed; .ci/run installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


def screenshot(page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60000)
    page.wait_for_timeout(800)
    page.screenshot(path=str(SCREENSHOTS / f"signin-{name}.png"), full_page=True)


def expect_sign_in_screen(page, timeout: float = 30000) -> None:
    """Only the sign-in screen: its button, no page navigation, no user, no pages' content."""
    from playwright.sync_api import expect

    expect(page.get_by_role("button", name="Sign in")).to_be_visible(timeout=timeout)
    page.wait_for_function("!document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=60000)
    expect(page.locator("[data-testid='stSidebarNav']")).to_have_count(0)
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    expect(page.get_by_role("heading", name="Runs")).to_have_count(0)


def sign_in(page, app_url: str, subject: str) -> None:
    """Signs in through the provider's own login form, typing the subject."""
    page.goto(app_url)
    page.get_by_role("button", name="Sign in").click()
    page.get_by_placeholder("sub").fill(subject)
    page.get_by_role("button", name="Authorize").click()
    page.get_by_role("button", name="Sign out").wait_for(timeout=30000)


def sidebar_user(page) -> str:
    return page.locator("[data-testid='stSidebarUserContent']").inner_text(timeout=30000)


@pytest.mark.browser
def test_users_sign_in_and_out_through_a_real_provider(signed_in_app, provider, browser):
    from playwright.sync_api import expect

    app_url, run_id = signed_in_app
    set_provider_user(provider, "alice-1", {"name": "Alice Example", "email": "alice@example.com",
                                            "email_verified": True})
    set_provider_user(provider, "bob-2", {"name": "Bob Builder", "email": "bob@example.com", "email_verified": True})

    alice = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    alice.goto(app_url)
    expect_sign_in_screen(alice)
    expect(alice.locator("td", has_text=run_id)).to_have_count(0)
    screenshot(alice, "1-signed-out")
    # A deep link to a page is no way around the sign-in screen.
    alice.goto(f"{app_url}/train")
    expect_sign_in_screen(alice)
    expect(alice.locator("[data-testid='stForm']")).to_have_count(0)

    sign_in(alice, app_url, "alice-1")
    expect(alice.locator("[data-testid='stSidebarNav']")).to_be_visible()
    # The run table is drawn on a canvas; its cells are in the page for screen readers.
    expect(alice.locator("td", has_text=run_id)).to_have_count(1, timeout=30000)
    assert "Alice Example" in sidebar_user(alice) and "admin" in sidebar_user(alice)
    screenshot(alice, "2-alice-admin")

    # A second browser (its own cookies) signs in as Bob, a viewer by issuer and subject.
    bob = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    sign_in(bob, app_url, "bob-2")
    assert "Bob Builder" in sidebar_user(bob) and "viewer" in sidebar_user(bob)
    screenshot(bob, "3-bob-viewer")
    # Alice is still Alice in her own browser.
    alice.reload()
    alice.get_by_role("button", name="Sign out").wait_for(timeout=30000)
    assert "Alice Example" in sidebar_user(alice) and "Bob" not in sidebar_user(alice)

    # Bob's identity cookie with a few bytes changed is no identity at all.
    cookies = bob.context.cookies()
    identity = next(cookie for cookie in cookies if cookie["name"] == USER_COOKIE)
    middle = len(identity["value"]) // 2
    flipped = "A" if identity["value"][middle] != "A" else "B"
    tampered = {**identity, "value": identity["value"][:middle] + flipped + identity["value"][middle + 1:]}
    bob.context.add_cookies([tampered])
    bob.reload()
    expect_sign_in_screen(bob)
    screenshot(bob, "4-tampered-cookie")

    # Sign-out ends the session at the provider too, and comes back to the sign-in screen.
    alice.get_by_role("button", name="Sign out").click()
    alice.get_by_role("button", name="End session").click()
    expect_sign_in_screen(alice)
    assert USER_COOKIE not in {cookie["name"] for cookie in alice.context.cookies()}
    screenshot(alice, "5-signed-out-again")


@pytest.mark.browser
# Streamlit 1.67 runs a session's first script in its old multipage mode, skipping the entry
# point's gate, when a folder named `pages/` sits beside streamlit_app.py
# (PagesManager.uses_pages_directory): that is why the pages live in `app_pages/`.
def test_a_deep_link_as_the_servers_first_request_still_needs_sign_in(signed_in_app, browser):
    app_url, run_id = signed_in_app
    page = browser.new_context(viewport={"width": 1280, "height": 800}).new_page()
    page.goto(f"{app_url}/train")
    # Whichever page the server runs, its title comes first; then it must be the sign-in screen.
    page.locator("h1").first.wait_for(timeout=30000)
    expect_sign_in_screen(page, timeout=2000)
    page.goto(f"{app_url}/")
    expect_sign_in_screen(page)


# ---------------------------------------------------------------------------------------
# A team on one server: a member's run, another member, an admin and a viewer.

TEAM = {"alice": {"name": "Alice Example", "email": "alice@example.com", "email_verified": True},
        "bob": {"name": "Bob Builder", "email": "bob@example.com", "email_verified": True},
        "ada": {"name": "Ada Admin", "email": "ada@example.com", "email_verified": True},
        "victor": {"name": "Victor Viewer", "email": "victor@example.com", "email_verified": True}}
# Each head epoch sleeps this long in the workers (a test-only fault, engine.runfiles.fault_point):
# on cached features an epoch takes milliseconds, and the long run must still be training
# when the admin stops it.
SLOW_EPOCHS = "epoch_end:sleep:0.5"
LONG_RUN_EPOCHS = 400  # at least 200 s of training at SLOW_EPOCHS; the admin stops it well before


@pytest.fixture
def team_app(tmp_path, provider):
    """The dashboard with Ada an admin (by e-mail), Victor a viewer (by issuer and subject), and
    Alice and Bob members; no runs yet. Yields the address, the runs root and the secrets file.
    Workers the pages started outlive the server by design (detached): they are ended too.
    """
    from engine.runfiles import FAULT_VARIABLE

    for subject, claims in TEAM.items():
        set_provider_user(provider, subject, claims)
    runs_dir = tmp_path / "runs"
    try:
        with serve_app(tmp_path, provider, admins=["ada@example.com"], viewers=[f"{provider}|victor"],
                       environment={FAULT_VARIABLE: SLOW_EPOCHS}) as app_url:
            yield app_url, runs_dir, tmp_path / "secrets.toml"
    finally:
        stop_live_workers(runs_dir)


def new_page(browser):
    """A page in a browser context of its own: its own cookies, so its own signed-in user."""
    return browser.new_context(viewport={"width": 1280, "height": 800}).new_page()


def app_user(provider_url: str, subject: str, secrets: Path):
    """The engine's user for `subject`, built from the same claims and secrets as the app builds it."""
    import tomllib

    from engine.users import access_settings, user_from_claims

    return user_from_claims({"iss": provider_url, "sub": subject, **TEAM[subject]},
                            access_settings(tomllib.loads(secrets.read_text())))


def go_to(page, title: str, heading: str | None = None) -> None:
    """Opens a page from the sidebar's navigation, as a user would, and waits for its heading."""
    page.locator("[data-testid='stSidebarNav'] a").filter(has_text=title).first.click()
    page.get_by_role("heading", name=heading or title, exact=True).wait_for(timeout=30000)


def run_ids(runs_dir: Path) -> set[str]:
    from engine.runs import run_folders

    return {folder.name for folder in run_folders(runs_dir)}


def start_run_on_train_page(page, runs_dir: Path, epochs: int) -> str:
    """Starts a run on the digits sample from the Train page's defaults, `epochs` head epochs; its id.

    The form opens on the built-in digits sample with the default backbone whose weights are on
    this machine. Images of 96 px (the digits are 64 px) keep feature extraction short on 2 cores.
    """
    from playwright.sync_api import expect

    go_to(page, "Train")
    expect(page.locator("input[aria-label='Dataset folder']")).to_have_value(re.compile(r"digits$"), timeout=30000)
    before = run_ids(runs_dir)
    page.locator("input[aria-label='Image size (px)']").fill("96")
    page.locator("input[aria-label='Epochs']").fill(str(epochs))
    page.get_by_role("button", name="Start training").click()
    # Start lands on Monitor, at the new run's address.
    page.get_by_role("heading", name="Monitor", exact=True).wait_for(timeout=30000)
    started = wait_until(lambda: run_ids(runs_dir) - before, timeout=30,
                         what="the new run's folder")
    (run_id,) = started
    expect(page).to_have_url(re.compile(rf"/monitor\?run={re.escape(run_id)}$"), timeout=30000)
    return run_id


def audit_lines(runs_dir: Path) -> list[tuple]:
    from engine import audit

    return [(entry["user_name"], entry["role"], entry["action"], entry["run"]) for entry in audit.read(runs_dir)]


def run_control(page, name: str):
    """A run's Stop / Resume / Kill button in the page's main area: while a script runs, Streamlit's
    header shows a "Stop" button of its own, which a page-wide search would also find."""
    return page.get_by_test_id("stMainBlockContainer").get_by_role("button", name=name)


@pytest.mark.browser
@pytest.mark.training
def test_a_team_shares_runs_by_role_through_a_real_provider(team_app, provider, browser):
    from playwright.sync_api import expect

    from engine import jobs
    from engine.config import RunConfig
    from engine.status import Stage, State, read_status
    from engine.users import Role

    app_url, runs_dir, secrets = team_app

    # Alice, a member, trains on the digits sample: one short run to the end, then a long one.
    alice = new_page(browser)
    sign_in(alice, app_url, "alice")
    assert "Alice Example" in sidebar_user(alice) and "member" in sidebar_user(alice)
    finished = start_run_on_train_page(alice, runs_dir, epochs=2)
    alice.get_by_test_id("stAlertContentSuccess").get_by_text("FINISHED").wait_for(timeout=240000)
    running = start_run_on_train_page(alice, runs_dir, epochs=LONG_RUN_EPOCHS)
    alice.get_by_test_id("stAlertContentInfo").get_by_text("RUNNING").wait_for(timeout=60000)
    expect(run_control(alice, "Stop")).to_be_enabled()
    # Training, not still starting: the features of the first run are cached, so epochs come fast.
    wait_until(lambda: (status := read_status(runs_dir / running)).stage is Stage.TRAINING_HEAD and status.epoch,
               timeout=120, what="the long run's first epoch")
    screenshot(alice, "6-alice-member-monitor")

    # Bob, another member, sees Alice's run and her name, but cannot stop it.
    bob = new_page(browser)
    sign_in(bob, app_url, "bob")
    assert "Bob Builder" in sidebar_user(bob) and "member" in sidebar_user(bob)
    # The run table is drawn on a canvas; its cells are in the page for screen readers.
    runs_table = bob.locator("[data-testid='stDataFrame']").first
    row = runs_table.locator("tr", has=bob.locator("td", has_text=running))
    expect(row).to_have_count(1, timeout=30000)
    owner_column = runs_table.locator("th").all_inner_texts().index("Owner")
    expect(row.locator("td").nth(owner_column)).to_have_text("Alice Example")
    screenshot(bob, "7-bob-member-home")
    bob.goto(f"{app_url}/monitor?run={running}")
    bob.get_by_test_id("stAlertContentInfo").get_by_text("RUNNING").wait_for(timeout=30000)
    for button in ("Stop", "Resume", "Kill"):
        expect(run_control(bob, button)).to_be_disabled()
    expect(bob.get_by_text("This run belongs to Alice Example: only they or an admin can stop")).to_be_visible()
    screenshot(bob, "8-bob-member-monitor")
    # The engine refuses Bob too, whatever a page shows him.
    bob_user = app_user(provider, "bob", secrets)
    assert (bob_user.id, bob_user.role) == (f"{provider}|bob", Role.MEMBER)
    with pytest.raises(PermissionError, match=r"belongs to Alice Example; only its owner or an admin may stop"):
        jobs.stop(running, runs_dir, user=bob_user)
    assert read_status(runs_dir / running).state is State.RUNNING

    # Ada, an admin, stops it; the audit log on her Home page shows who started and who stopped it.
    ada = new_page(browser)
    sign_in(ada, app_url, "ada")
    assert "Ada Admin" in sidebar_user(ada) and "admin" in sidebar_user(ada)
    ada.goto(f"{app_url}/monitor?run={running}")
    ada.get_by_test_id("stAlertContentInfo").get_by_text("RUNNING").wait_for(timeout=30000)
    assert read_status(runs_dir / running).state is State.RUNNING, "the run ended before the admin could stop it"
    stop = run_control(ada, "Stop")
    expect(stop).to_be_enabled()
    expect(ada.get_by_text("belongs to")).to_have_count(0)
    stop.click()
    wait_until(lambda: read_status(runs_dir / running).state is State.STOPPED, timeout=120, what="the run to stop")
    assert read_status(runs_dir / running).epoch < LONG_RUN_EPOCHS
    ada.get_by_test_id("stAlertContentWarning").get_by_text("STOPPED").wait_for(timeout=30000)
    screenshot(ada, "9-admin-stopped")
    go_to(ada, "Home", heading="Transfer Studio")
    ada.get_by_text("Administration: queue and audit log").click()
    administration = ada.locator("[data-testid='stExpander']").filter(has_text="Administration: queue and audit log")
    audit_table = administration.locator("[data-testid='stDataFrame']")
    for name, action in (("Alice Example", "start"), ("Ada Admin", "stop")):
        line = audit_table.locator("tr", has=ada.locator("td", has_text=running)).filter(
            has=ada.locator("td", has_text=re.compile(rf"^{action}$"))).filter(has_text=name)
        expect(line).to_have_count(1, timeout=30000)
    audit_table.scroll_into_view_if_needed()
    screenshot(ada, "10-admin-audit-log")
    # Bob's refused stop left no trace: only what happened is in the log.
    assert audit_lines(runs_dir) == [("Alice Example", "member", "start", finished),
                                     ("Alice Example", "member", "start", running),
                                     ("Ada Admin", "admin", "stop", running)]

    # Victor, a viewer, explores the finished run but cannot start one.
    victor = new_page(browser)
    sign_in(victor, app_url, "victor")
    assert "Victor Viewer" in sidebar_user(victor) and "viewer" in sidebar_user(victor)
    victor.goto(f"{app_url}/evaluate?run={finished}")
    victor.get_by_role("heading", name="Confusion matrix").wait_for(timeout=30000)
    expect(victor.get_by_role("combobox", name="Run")).to_have_value(
        # "<default name> (<run id>) · finished · best …": every run has a name now.
        re.compile(rf"^.+ \({re.escape(finished)}\) · finished · best \d+\.\d% · Alice Example$"))
    victor.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=30000)
    screenshot(victor, "11-viewer-evaluate")
    go_to(victor, "Train")
    expect(victor.get_by_text("You are signed in as a viewer: you can look at every run, but not start one.")
           ).to_be_visible()
    start = victor.get_by_role("button", name="Start training")
    expect(start).to_be_disabled()
    start.scroll_into_view_if_needed()
    screenshot(victor, "12-viewer-train")
    victor_user = app_user(provider, "victor", secrets)
    assert victor_user.role is Role.VIEWER
    with pytest.raises(PermissionError, match="Victor Viewer is a viewer"):
        jobs.start(RunConfig(), runs_dir, user=victor_user)
    for page in (alice, bob, ada, victor):
        expect(page.locator("[data-testid='stException']")).to_have_count(0)
    assert run_ids(runs_dir) == {finished, running}
