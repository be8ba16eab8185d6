"""Sign-in: local mode without `[auth]`, and Streamlit's OpenID Connect sign-in with it.

The AppTest tests give `st.user` claims directly. The browser test signs real users in
through a real OpenID Connect provider on localhost (oidc-provider-mock, whose login form
takes any subject), with the app served by `streamlit run` and driven in Debian's Chromium.
Screenshots go to test-artifacts/screenshots/signin-*.png.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import REPO_ROOT, tiny_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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


# ---------------------------------------------------------------------------------------
# In a real browser, against a real OpenID Connect provider.

HOST = "127.0.0.1"  # the one host name for the browser, the app, the redirect URI and the provider


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


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


@pytest.fixture
def signed_in_app(tmp_path, provider):
    """The dashboard with `[auth]` pointing at the provider, served by `streamlit run`.

    Its secrets file is a temporary one passed with `--secrets.files`, so nothing is written
    into the repository's .streamlit/. Alice (by verified e-mail) is an admin and Bob (by
    issuer and subject) a viewer. One queued run exists, so a leak of the Home page would show.
    """
    from engine.runs import create_run

    port = free_port()
    app_url = f"http://{HOST}:{port}"
    runs_dir, data_dir = tmp_path / "runs", tmp_path / "appdata"
    data_dir.mkdir()
    run_dir = create_run(tiny_config(data_dir), runs_dir=runs_dir)
    auth = auth_section(app_url, provider)
    secrets = tmp_path / "secrets.toml"
    # Top-level keys come before the [auth] table in TOML.
    secrets.write_text(f'admins = ["alice@example.com"]\nviewers = ["{provider}|bob-2"]\n\n[auth]\n'
                       + "".join(f'{key} = "{value}"\n' for key, value in auth.items()))
    environment = {**os.environ, "TRANSFER_STUDIO_RUNS": str(runs_dir), "TRANSFER_STUDIO_DATA": str(data_dir),
                   "TRANSFER_STUDIO_OFFLINE": "1"}
    log = tmp_path / "streamlit.log"
    process = start_process(
        [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
         "--server.headless", "true", "--server.address", HOST, "--browser.gatherUsageStats", "false",
         "--server.fileWatcherType", "none", "--secrets.files", str(secrets)],
        log, environment)
    try:
        wait_for_http(f"{app_url}/_stcore/health", process, log)
        yield app_url, run_dir.name
    finally:
        stop_process(process)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is not installed; .ci/run installs it (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"])
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
