"""Users and roles: identity from the token's issuer and subject, roles from the operator's lists."""

import pytest

from engine.users import AccessSettings, Role, User, access_settings, local_user, user_from_claims

ISSUER = "https://id.example.org"


def claims(subject, email="", **more):
    return {"iss": ISSUER, "sub": subject, "email": email, "email_verified": True, "name": subject.title(), **more}


def test_a_user_is_their_issuer_and_subject_not_their_email():
    alice = user_from_claims(claims("alice", "alice@example.org"))
    impostor = user_from_claims({"iss": "https://elsewhere.example", "sub": "alice", "email": "alice@example.org"})
    assert alice.id == f"{ISSUER}|alice" and alice.id != impostor.id
    assert (alice.name, alice.email, alice.role) == ("Alice", "alice@example.org", Role.MEMBER)
    with pytest.raises(ValueError, match="no issuer"):
        user_from_claims({"email": "alice@example.org"})


def test_roles_come_from_the_lists_and_groups_in_secrets():
    settings = access_settings({"admins": ["Root@Example.org"], "viewers": [f"{ISSUER}|carol"],
                                "groups_claim": "groups", "admin_groups": ["ops"], "viewer_groups": ["board"]})
    assert user_from_claims(claims("root", "root@example.org"), settings).role is Role.ADMIN
    assert user_from_claims(claims("carol"), settings).role is Role.VIEWER
    assert user_from_claims(claims("dave", groups=["ops"]), settings).role is Role.ADMIN
    assert user_from_claims(claims("erin", groups=["board"]), settings).role is Role.VIEWER
    assert user_from_claims(claims("frank"), settings).role is Role.MEMBER
    # An e-mail grants a role only when the provider says it is verified: anybody can type one.
    for verified in (False, "false", "true", None):
        mallory = claims("mallory", "root@example.org", email_verified=verified)
        assert user_from_claims(mallory, settings).role is Role.MEMBER, verified
    trusting = access_settings({"admins": ["root@example.org"], "trust_unverified_emails": True})
    assert user_from_claims(claims("root", "root@example.org", email_verified=None), trusting).role is Role.ADMIN


def test_members_can_be_an_allow_list_so_a_changed_email_makes_nobody_a_member():
    settings = access_settings({"default_role": "viewer", "members": ["alice@example.org"],
                                "member_groups": ["staff"], "groups_claim": "groups"})
    assert user_from_claims(claims("alice", "alice@example.org"), settings).role is Role.MEMBER
    assert user_from_claims(claims("dave", groups=["staff"]), settings).role is Role.MEMBER
    # Bob, a viewer by default, changes his e-mail to one nobody listed: still a viewer.
    assert user_from_claims(claims("bob", "bob.new@example.org"), settings).role is Role.VIEWER
    with pytest.raises(ValueError, match="`default_role`"):
        access_settings({"default_role": "admin"})


def test_who_may_control_a_run():
    alice, bob = User("id|alice", "Alice"), User("id|bob", "Bob")
    admin, viewer = User("id|root", "Root", role=Role.ADMIN), User("id|carol", "Carol", role=Role.VIEWER)
    assert alice.can_control("id|alice") and not bob.can_control("id|alice")
    assert admin.can_control("id|alice") and not viewer.can_control("id|carol")
    assert not alice.can_control("")  # a run without an owner belongs to the admins
    assert alice.can_start and not viewer.can_start


def test_local_mode_is_one_admin_named_after_the_system_user():
    user = local_user()
    assert user.id.startswith("local:") and user.role is Role.ADMIN and user.name


@pytest.mark.parametrize("secrets, field", [({"admins": 3}, "admins"), ({"max_queued_per_user": -1}, "max_queued_per_user"),
                                            ({"groups_claim": ["x"]}, "groups_claim")])
def test_bad_access_settings_name_the_setting(secrets, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        access_settings(secrets)


def test_limits_default_to_none():
    assert access_settings({}) == AccessSettings()
