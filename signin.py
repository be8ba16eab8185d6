"""Who is using the dashboard: Streamlit's OpenID Connect sign-in, or local mode.

Without an `[auth]` section in `.streamlit/secrets.toml` the dashboard runs in local mode,
as it always has: one user, named after the operating-system user, who may do everything
(`engine.users.local_user()`). With `[auth]`, a visitor sees nothing but a sign-in screen
until they sign in with the organisation's OpenID Connect provider (`st.login`); the user is
then identified by the ID token's issuer and subject (`engine.users.user_from_claims`), and
the `admins` / `viewers` lists in the same file give the role.

Pages ask `current_user()`; the entry point passes its pages through `gate()`.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Mapping, Optional, Sequence

import streamlit as st
from streamlit.errors import StreamlitSecretNotFoundError

from engine.users import Role, User, access_settings, local_user, user_from_claims

# Streamlit's error id for "no secrets file at any of the configured paths": the one case
# that means local mode. Any other failure to read the secrets (a TOML syntax error, a bad
# path) stops the dashboard, or a typo in the file would open a team server to everyone.
_NO_SECRETS_FILE = "no-secrets-found"

_ROLE_LABELS = {Role.ADMIN: "admin", Role.MEMBER: "member", Role.VIEWER: "viewer · read only"}
# A team server says so explicitly (docs/team-server.md): then no secrets, or secrets without
# `[auth]`, stop the dashboard instead of opening it to everyone as the local admin.
REQUIRE_SIGNIN_VARIABLE = "TRANSFER_STUDIO_REQUIRE_SIGNIN"
# Once this server process has seen `[auth]`, losing it (a file deleted while being edited,
# a redeploy that forgot it) is an error, not a switch to local mode: sign-in fails closed.
_auth_seen = threading.Event()


class SignInError(RuntimeError):
    """The sign-in settings or the signed-in identity cannot be used; the message says why."""


def read_secrets() -> Mapping[str, Any]:
    """The parsed secrets, or an empty mapping when there is no secrets file at all.

    Raises:
        SignInError: a secrets file exists but cannot be read.
    """
    try:
        # Looked up on the module every time, not imported by name: AppTest swaps `st.secrets`.
        return st.secrets.to_dict()
    except StreamlitSecretNotFoundError as error:
        if getattr(error, "error_id", None) == _NO_SECRETS_FILE:
            return {}
        raise SignInError(f"The secrets file cannot be read, so nobody can sign in: {error}") from error


def signed_in_mode() -> bool:
    """Whether users must sign in: the secrets have an `[auth]` section.

    Raises:
        SignInError: a secrets file exists but cannot be read, or `auth` is not a table.
    """
    auth = read_secrets().get("auth")
    if auth is None:
        if _auth_seen.is_set() or os.environ.get(REQUIRE_SIGNIN_VARIABLE) == "1":
            raise SignInError("Sign-in is required on this server, but the secrets file with its [auth] "
                              "section cannot be found; nobody can sign in until it is back.")
        return False
    if not isinstance(auth, Mapping):
        raise SignInError(f"`auth` in secrets.toml must be a table (`[auth]`); received {auth!r}.")
    _auth_seen.set()
    return True


def _signed_in_claims() -> Optional[dict]:
    # Streamlit verifies the signed identity cookie when the browser session starts: a
    # missing, expired or tampered cookie leaves `is_logged_in` false.
    claims = dict(st.user)
    return claims if claims.get("is_logged_in") else None


def current_user() -> User:
    """The user of this session: the local user in local mode, the signed-in user otherwise.

    Built on every call rather than kept in `st.session_state`: it is cheap, and a role
    changed in secrets.toml (Streamlit reloads the file when it changes) or a sign-out then
    takes effect on the next rerun.

    Raises:
        SignInError: sign-in is on but nobody is signed in, the token has no issuer or
            subject, or the access lists in secrets.toml are malformed.
    """
    if not signed_in_mode():
        return local_user()
    claims = _signed_in_claims()
    if claims is None:
        raise SignInError("Nobody is signed in: sign in first.")
    try:
        return user_from_claims(claims, access_settings(read_secrets()))
    except ValueError as error:
        raise SignInError(str(error)) from error


def sign_in_page() -> None:
    """The only page a signed-out visitor sees: what this is, and a button to the provider."""
    st.title("Transfer Studio")
    st.write("Build image classifiers by transfer learning. Sign in with your organisation's account to continue.")
    if st.button("Sign in", icon=":material/login:", type="primary"):
        st.login()


def escape_markdown(text: str) -> str:
    """`text` as it reads, when shown through Markdown (names from the provider, class folder names)."""
    # Names come from the identity provider: Markdown, emoji shortcodes (`:x:`) or `$`
    # (LaTeX) in a name must show as typed, not format the sidebar.
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$:])", r"\\\1", text)


def show_user_in_sidebar(user: User) -> None:
    """The signed-in user's name, e-mail and role in the sidebar, with a sign-out button."""
    with st.sidebar:
        st.markdown(f":material/account_circle: **{escape_markdown(user.name)}**")
        details = [user.email] if user.email and user.email != user.name else []
        st.caption(" · ".join(escape_markdown(detail) for detail in [*details, _ROLE_LABELS[user.role]]))
        if st.button("Sign out", icon=":material/logout:", key="sign_out"):
            st.logout()


def _problem_page(error: SignInError):
    def sign_in_problem() -> None:
        st.title("Transfer Studio")
        st.error(str(error), icon=":material/lock:")
        # A signed-in user whose identity cannot be used may still leave and try another account.
        if st.user.get("is_logged_in") and st.button("Sign out", icon=":material/logout:"):
            st.logout()

    return sign_in_problem


def _only(screen, title: str, icon: str, pages: Sequence[st.Page]) -> list:
    # One screen, also at every page's address (hidden from any menu): a signed-out
    # visitor's bookmark shows that screen, not a "Page not found" dialog.
    addresses = [page.url_path for page in pages if page.url_path]
    return [st.Page(screen, title=title, icon=icon, default=True),
            *(st.Page(screen, title=title, url_path=address, visibility="hidden") for address in addresses)]


def page_user() -> User:
    """The user a page acts for; called first by every page, so no page shows anything unsigned.

    The entry point's gate already keeps signed-out visitors on the sign-in screen; this is
    the second lock, for a page that is ever run without the entry point.
    """
    try:
        return current_user()
    except SignInError:
        if signed_in_mode() and _signed_in_claims() is None:
            sign_in_page()
            st.stop()
        raise


def gate(pages: Sequence[st.Page]) -> list:
    """The pages this visitor may open: all of `pages`, or only a sign-in screen.

    In local mode every page, as before. In signed-in mode a signed-out visitor gets only the
    sign-in page (no navigation, no runs); a signed-in user gets every page and their name
    in the sidebar. A set-up that cannot be used (an unreadable secrets file, a token without
    issuer or subject, malformed access lists) gets one page that says why, never local mode.

    Always returns pages for `st.navigation`: a script that stopped before `st.navigation`
    would leave Streamlit to run the entry script as a page of its own.
    """
    try:
        if not signed_in_mode():
            return list(pages)
        if _signed_in_claims() is None:
            return _only(sign_in_page, "Sign in", ":material/login:", pages)
        user = current_user()
    except SignInError as error:
        return _only(_problem_page(error), "Sign-in problem", ":material/lock:", pages)
    show_user_in_sidebar(user)
    return list(pages)
