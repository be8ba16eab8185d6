"""Who acts: users, their roles, and what each role may do to a run.

Local mode (no `[auth]` in `.streamlit/secrets.toml`, and every CLI call) has one user,
named after the operating-system user, who may do everything. On a team server a user
signs in with the organisation's OpenID Connect provider and is identified by the token's
issuer and subject (`iss`, `sub`), never by e-mail alone: e-mails and names change hands,
an issuer's subject does not. Name and e-mail are for display and for the admin and
viewer lists an operator writes.

The rules live here and are enforced by `engine.jobs`, not only by disabled buttons.
This module never imports TensorFlow or Streamlit.
"""

from __future__ import annotations

import enum
import getpass
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional


class Role(str, enum.Enum):
    """What a user may do: admins control every run, members their own, viewers only look."""

    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class User:
    """Someone acting on runs.

    Attributes:
        id: Stable identity: `local:<os user>` in local mode, `<issuer>|<subject>` when signed in.
        name: For display.
        email: For display and for the admin/viewer lists (may be empty).
        role: What the user may do.
    """

    id: str
    name: str
    email: str = ""
    role: Role = Role.MEMBER

    @property
    def can_start(self) -> bool:
        """Members and admins start runs; viewers do not."""
        return self.role is not Role.VIEWER

    def can_control(self, owner: str) -> bool:
        """Whether this user may stop, kill, resume, rename, delete or restore a run owned by `owner`."""
        if self.role is Role.ADMIN:
            return True
        return self.role is Role.MEMBER and bool(owner) and owner == self.id


@dataclass(frozen=True)
class AccessSettings:
    """The access rules an operator writes in `.streamlit/secrets.toml` (top level, beside `[auth]`).

    Attributes:
        admins, members, viewers: E-mails or user ids (`issuer|subject`) with those roles.
        groups_claim: The token claim that lists a user's groups (e.g. "groups"), if any.
        admin_groups, member_groups, viewer_groups: Groups whose members get those roles.
        default_role: The role of a signed-in user no list names: "member" (the default) or
            "viewer", which makes `members` / `member_groups` an allow-list, so that nobody
            becomes a member by changing the e-mail their viewer entry named.
        trust_unverified_emails: Let e-mails grant roles when the provider does not say they are
            verified (some providers, e.g. Microsoft Entra ID, send no `email_verified`); off by
            default, since anybody can type an e-mail into an account where it is not checked.
        max_running_per_user, max_queued_per_user: Per-user limits; 0 means no limit.
    """

    admins: frozenset = field(default_factory=frozenset)
    members: frozenset = field(default_factory=frozenset)
    viewers: frozenset = field(default_factory=frozenset)
    groups_claim: str = ""
    admin_groups: frozenset = field(default_factory=frozenset)
    member_groups: frozenset = field(default_factory=frozenset)
    viewer_groups: frozenset = field(default_factory=frozenset)
    default_role: "Role" = Role.MEMBER
    trust_unverified_emails: bool = False
    max_running_per_user: int = 0
    max_queued_per_user: int = 0


def access_settings(secrets: Mapping[str, Any]) -> AccessSettings:
    """Reads AccessSettings from a secrets mapping (`st.secrets` or a parsed TOML file).

    Raises:
        ValueError: a setting has the wrong type, named with what was expected.
    """
    def names(key: str) -> frozenset:
        value = secrets.get(key, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"`{key}` in secrets.toml must be a list of e-mails or user ids; received {value!r}.")
        return frozenset(item.strip().lower() if "@" in item else item.strip() for item in value)

    def limit(key: str) -> int:
        value = secrets.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`{key}` in secrets.toml must be a whole number ≥ 0 (0: no limit); received {value!r}.")
        return value

    groups_claim = secrets.get("groups_claim", "")
    if not isinstance(groups_claim, str):
        raise ValueError(f"`groups_claim` in secrets.toml must be a claim name; received {groups_claim!r}.")
    default_role = secrets.get("default_role", "member")
    if default_role not in ("member", "viewer"):
        raise ValueError(f"`default_role` in secrets.toml must be \"member\" or \"viewer\"; received {default_role!r}.")
    trust = secrets.get("trust_unverified_emails", False)
    if not isinstance(trust, bool):
        raise ValueError(f"`trust_unverified_emails` in secrets.toml must be true or false; received {trust!r}.")
    return AccessSettings(admins=names("admins"), members=names("members"), viewers=names("viewers"),
                          groups_claim=groups_claim, admin_groups=names("admin_groups"),
                          member_groups=names("member_groups"), viewer_groups=names("viewer_groups"),
                          default_role=Role(default_role), trust_unverified_emails=trust,
                          max_running_per_user=limit("max_running_per_user"),
                          max_queued_per_user=limit("max_queued_per_user"))


def local_user() -> User:
    """The one user of local mode and of the CLI: the operating-system user, an admin."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = os.environ.get("USER") or "local"
    return User(id=f"local:{name}", name=name, role=Role.ADMIN)


def user_from_claims(claims: Mapping[str, Any], settings: Optional[AccessSettings] = None) -> User:
    """The signed-in user from an ID token's claims (`st.user`), with the role the settings give.

    Raises:
        ValueError: the claims lack an issuer or a subject (a provider that is not OIDC).
    """
    settings = settings or AccessSettings()
    issuer, subject = claims.get("iss"), claims.get("sub")
    if not issuer or not subject:
        raise ValueError("The sign-in token has no issuer (`iss`) or subject (`sub`); "
                         "Transfer Studio needs an OpenID Connect provider.")
    user_id = f"{issuer}|{subject}"
    email = str(claims.get("email") or "")
    name = str(claims.get("name") or claims.get("preferred_username") or email or subject)
    groups = claims.get(settings.groups_claim, []) if settings.groups_claim else []
    groups = {str(group) for group in ([groups] if isinstance(groups, str) else groups or [])}
    # Only a verified e-mail may grant a role (exactly `true`, not "false" or a missing claim):
    # an unverified one can be typed by anybody. List entries with "@" are e-mails, others ids.
    verified = claims.get("email_verified") is True or settings.trust_unverified_emails
    names = {user_id} | ({email.lower()} if email and verified else set())

    def listed(entries: frozenset, group_entries: frozenset) -> bool:
        return bool(names & entries) or bool(groups & group_entries)

    if listed(settings.admins, settings.admin_groups):
        role = Role.ADMIN
    elif listed(settings.viewers, settings.viewer_groups):
        role = Role.VIEWER
    elif listed(settings.members, settings.member_groups):
        role = Role.MEMBER
    else:
        role = settings.default_role
    return User(id=user_id, name=name, email=email, role=role)
