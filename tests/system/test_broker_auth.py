"""splitglm.broker_auth: Mosquitto's ACL and password file semantics, as the embedded broker enforces them."""

from __future__ import annotations

import pytest

from splitglm.broker_auth import READ, WRITE, Acl, covers, load_passwords, login_ok, strip_share
from splitglm.mqtt_access import acl_text, clientids_text, hash_password, load_clientids, logins

LOGINS = logins(["d", "e"], ["edge-a", "edge-b"], {"edge-b": ["e"]})
ACL = Acl.parse(acl_text(LOGINS))


@pytest.mark.parametrize("rule,subscription,expected", [
    ("a/#", "a", True),  # '#' matches the parent level too
    ("a/#", "a/b/c", True),
    ("a/+/c", "a/b/c", True),
    ("a/+/c", "a/+/c", True),
    ("a/+/c", "a/#", False),
    ("a/b", "a/+", False),
    ("a/+", "a/b/c", False),
    ("a/b/c", "a/b", False),
    ("#", "$SYS/x", False),  # wildcards at the first level skip $-topics
    ("+/x", "$SYS/x", False),
    ("splitglm/v1/device/d/steps", "splitglm/v1/device/#", False),
])
def test_covers(rule, subscription, expected):
    assert covers(rule, subscription) is expected


def test_device_patterns_confine_a_device_to_its_own_topics():
    assert ACL.allows("d", "c1", "splitglm/v1/edge/pool/frames/d", WRITE)
    assert not ACL.allows("d", "c1", "splitglm/v1/edge/pool/frames/e", WRITE)  # no frames under another id
    assert not ACL.allows("d", "c1", "splitglm/v1/edge/pool/frames/d", READ)
    assert ACL.allows("d", "c1", "splitglm/v1/device/d/steps", READ)
    assert not ACL.allows("d", "c1", "splitglm/v1/device/d/steps", WRITE)
    assert not ACL.allows("d", "c1", "splitglm/v1/device/e/steps", READ)
    assert ACL.allows("d", "c1", "sensors/d/temperature", READ | WRITE)
    assert not ACL.allows(None, "c1", "sensors/d/temperature", READ)  # %u never matches an anonymous client
    assert not ACL.allows("+", "c1", "sensors/x/temperature", READ)  # nor a name that would widen the rule


def test_subscriptions_need_a_read_rule_covering_the_whole_filter():
    assert ACL.allows_subscription("d", "c", "splitglm/v1/device/d/steps")
    assert ACL.allows_subscription("d", "c", "sensors/d/#")
    assert not ACL.allows_subscription("d", "c", "splitglm/v1/device/#")
    assert not ACL.allows_subscription("d", "c", "splitglm/v1/device/+/steps")
    assert not ACL.allows_subscription("d", "c", "splitglm/v1/edge/+/frames/+")
    assert ACL.allows_subscription("edge-a", "c", "$share/splitglm-edges/splitglm/v1/edge/pool/frames/+")
    assert ACL.allows_subscription("edge-a", "c", "splitglm/v1/edge/edge-a/frames/+")
    assert not ACL.allows_subscription("edge-a", "c", "splitglm/v1/device/+/steps")  # edges write steps only
    assert ACL.allows("edge-a", "c", "splitglm/v1/device/d/steps", WRITE)
    assert strip_share("$share/g/a/b") == "a/b" and strip_share("a/b") == "a/b"


def test_edges_read_their_own_frames_and_the_pool_and_write_their_devices_steps():
    assert not ACL.allows_subscription("edge-b", "c", "splitglm/v1/edge/edge-a/frames/+")  # another edge's
    assert not ACL.allows_subscription("edge-b", "c", "splitglm/v1/edge/+/frames/+")
    assert ACL.allows_subscription("edge-b", "c", "$share/splitglm-edges/splitglm/v1/edge/pool/frames/+")
    assert ACL.allows("edge-b", "c", "splitglm/v1/device/e/steps", WRITE)
    assert not ACL.allows("edge-b", "c", "splitglm/v1/device/d/steps", WRITE)  # --serves edge-b=e
    assert not ACL.allows("edge-a", "c", "results/d", WRITE)  # an edge answers on steps topics only


def test_service_logins_get_explicit_topics_and_no_devices():
    assert ACL.allows("d$sensors", "c", "sensors/d/temperature", WRITE)
    assert not ACL.allows("d$sensors", "c", "sensors/e/temperature", WRITE)
    assert not ACL.allows("d$sensors", "c", "sensors/d/temperature", READ)
    assert not ACL.allows("d$sensors", "c", "splitglm/v1/edge/pool/frames/d", WRITE)
    assert ACL.allows_subscription("d$app", "c", "results/d") and not ACL.allows_subscription("d$app", "c", "results/e")
    assert not ACL.allows("d$app", "c", "sensors/d/x", WRITE)


def test_every_login_has_one_client_id_and_no_two_share_one(tmp_path):
    bound = {login.name: login.client_id for login in LOGINS}
    assert bound["d"] == "splitglm-device-d" and bound["edge-a"] == "splitglm-edge-edge-a"
    assert bound["d$sensors"] == "splitglm-sensors-d" and bound["d$app"] == "splitglm-app-d"
    assert len(set(bound.values())) == len(bound)
    path = tmp_path / "clientids"
    path.write_text(clientids_text(LOGINS))
    assert load_clientids(path) == bound
    path.write_text("a splitglm-x\nb splitglm-x\n")
    with pytest.raises(ValueError, match="clientids:2"):
        load_clientids(path)
    with pytest.raises(ValueError, match="--serves"):
        logins(["d"], ["edge-a"], {"edge-a": ["nobody"]})


def test_deny_wins_and_anonymous_topics_and_client_ids():
    acl = Acl.parse("topic read public/#\npattern readwrite clients/%c/#\nuser u\ntopic a/#\ntopic deny a/secret\n")
    assert acl.allows(None, "x", "public/news", READ) and not acl.allows("u", "x", "public/news", READ)
    assert acl.allows("u", "x", "a/b", WRITE) and acl.allows("u", "x", "a/b", READ)  # no access word: readwrite
    assert not acl.allows("u", "x", "a/secret", READ)
    assert not acl.allows_subscription("u", "x", "a/secret")
    assert acl.allows("u", "cid", "clients/cid/t", WRITE) and not acl.allows("u", "cid", "clients/other/t", WRITE)


def test_bad_acl_lines_are_named():
    with pytest.raises(ValueError, match="acl:2"):
        Acl.parse("user u\nsubscribe a/b\n")


def test_password_file_logins(tmp_path):
    path = tmp_path / "passwd"
    path.write_text(f"# comment\nalice:{hash_password('right')}\n")
    users = load_passwords(path)
    assert login_ok(users, "alice", "right")
    assert not login_ok(users, "alice", "wrong")
    assert not login_ok(users, "bob", "right")
    assert not login_ok(users, None, None) and not login_ok(users, "", "right")
    path.write_text("alice:plaintext\n")
    with pytest.raises(ValueError, match="passwd:1"):
        load_passwords(path)
