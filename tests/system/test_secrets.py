"""``splitglm secrets``: the files of the security contract, their modes, certificates and hashes."""

from __future__ import annotations

import base64
import ipaddress
import json
import shutil
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from splitglm.credentials import (
    PBKDF2_ITERATIONS,
    acl_rules,
    check_password,
    dynsec_config,
    hash_password,
    logins,
    make_secrets,
)

SECRET_FILES = [
    "ca.key", "cloud/server.key", "edge/server.key", "edge/client.key", "mosquitto/server.key",
    "mosquitto/passwd", "mosquitto/dynamic-security.json", "devices/dev-a/password", "devices/dev-b/password",
    "edges/edge-a/password", "api-key", "sensors/dev-a/password", "apps/dev-b/password", "health/password",
    "cloud/health-client.key",
]
PUBLIC_FILES = [
    "ca.crt", "cloud/server.crt", "edge/server.crt", "edge/client.crt", "mosquitto/server.crt",
    "mosquitto/mosquitto.conf", "mosquitto/acl", "mosquitto/clientids", "devices/dev-a/username",
    "edges/edge-a/username", "sensors/dev-b/username",
]


def splitglm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "splitglm.cli", *args], capture_output=True, text=True, timeout=120)


def mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_cli_writes_the_contract_layout_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "secrets"
    r = splitglm("secrets", "--out", str(out), "--devices", "dev-a,dev-b", "--edges", "edge-a",
                 "--hosts", "edge.example,10.0.0.5", "--api-keys", "3", "--mqtt-port", "18883")
    assert r.returncode == 0, r.stderr
    for name in SECRET_FILES:
        assert mode(out / name) == 0o600, name
        assert f"0600     0  {out / name}" in r.stdout  # it says what it wrote (mode, owner)
    for name in PUBLIC_FILES:
        assert (out / name).is_file(), name
    folders = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert len(folders) >= 9 and all(mode(f) == 0o700 for f in folders)
    assert (out / "devices/dev-b/username").read_text().strip() == "dev-b"
    keys = (out / "api-key").read_text().split()
    assert len(keys) == 3 and len(set(keys)) == 3

    ca_key = (out / "ca.key").read_bytes()
    r = splitglm("secrets", "--out", str(out))
    assert r.returncode == 2 and "--force" in r.stderr and str(out) in r.stderr
    assert (out / "ca.key").read_bytes() == ca_key  # nothing replaced
    r = splitglm("secrets", "--out", str(out), "--force", "--devices", "dev-a,dev-b", "--edges", "edge-a")
    assert r.returncode == 0, r.stderr
    assert (out / "ca.key").read_bytes() != ca_key


@pytest.fixture(scope="module")
def secrets(tmp_path_factory):
    return make_secrets(tmp_path_factory.mktemp("s") / "secrets", ["dev-a", "dev-b"], ["edge-a"],
                        ["edge.example", "10.0.0.5"], mqtt_port=18883, mosquitto_plugin=None)


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize("folder,service", [("cloud", "cloud"), ("edge", "edge"), ("mosquitto", "mosquitto")])
def test_server_certificates_chain_to_the_ca_and_name_every_host(secrets, folder, service):
    ca, cert = _cert(secrets / "ca.crt"), _cert(secrets / folder / "server.crt")
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "edge.example", service}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"),
                                                            ipaddress.ip_address("10.0.0.5")}
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usage
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_edge_client_certificate_is_for_clients(secrets):
    cert = _cert(secrets / "edge" / "client.crt")
    cert.verify_directly_issued_by(_cert(secrets / "ca.crt"))
    assert cert.subject.rfc4514_string() == "CN=edge"
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]


def test_password_file_holds_one_mosquitto_hash_per_login(secrets):
    entries = dict(line.split(":", 1) for line in (secrets / "mosquitto/passwd").read_text().splitlines())
    assert set(entries) == {"dev-a", "dev-b", "edge-a", "dev-a$sensors", "dev-b$sensors", "dev-a$app", "dev-b$app",
                            "broker$health"}
    folders = {login.name: login.folder for login in logins(["dev-a", "dev-b"], ["edge-a"])}
    for user, hashed in entries.items():
        password = (secrets / folders[user] / "password").read_text().strip()
        assert (secrets / folders[user] / "username").read_text().strip() == user
        assert hashed.startswith("$7$101$") and check_password(password, hashed)
        assert not check_password(password + "x", hashed)


def test_mosquitto_conf_and_acl(secrets):
    conf = (secrets / "mosquitto/mosquitto.conf").read_text().splitlines()
    for line in ("listener 18883", "allow_anonymous false", "per_listener_settings false", "tls_version tlsv1.2",
                 f"password_file {secrets}/mosquitto/passwd", f"acl_file {secrets}/mosquitto/acl",
                 f"cafile {secrets}/ca.crt", f"certfile {secrets}/mosquitto/server.crt",
                 f"keyfile {secrets}/mosquitto/server.key"):
        assert line in conf
    assert "max_packet_size 67174400" in conf and "max_queued_bytes 268697600" in conf  # 64 MiB frames + 64 KiB
    acl = (secrets / "mosquitto/acl").read_text()
    assert "pattern write splitglm/v1/edge/+/frames/%u" in acl
    assert ("user edge-a\ntopic read splitglm/v1/edge/edge-a/frames/+\ntopic read splitglm/v1/edge/pool/frames/+\n"
            "topic write splitglm/v1/device/dev-a/steps\ntopic write splitglm/v1/device/dev-b/steps\n") in acl
    assert "user dev-a$sensors\ntopic write sensors/dev-a/#\n" in acl and "+/steps" not in acl
    assert "dev-a$sensors splitglm-sensors-dev-a" in (secrets / "mosquitto/clientids").read_text().splitlines()


def test_the_caps_follow_the_frame_limit(tmp_path):
    out = make_secrets(tmp_path / "s", ["d"], ["e"], max_frame_bytes=1 << 20, mosquitto_plugin=None)
    conf = (out / "mosquitto/mosquitto.conf").read_text().splitlines()
    assert f"max_packet_size {(1 << 20) + (64 << 10)}" in conf and "max_queued_messages 10000" in conf
    assert f"max_queued_bytes {4 * ((1 << 20) + (64 << 10))}" in conf


def test_mosquitto_conf_with_the_dynamic_security_plugin(tmp_path):
    out = make_secrets(tmp_path / "s", ["dev-a"], ["edge-a"], mosquitto_plugin="/usr/lib/mosquitto_dynamic_security.so")
    conf = (out / "mosquitto/mosquitto.conf").read_text().splitlines()
    assert "plugin /usr/lib/mosquitto_dynamic_security.so" in conf
    assert f"plugin_opt_config_file {out}/mosquitto/dynamic-security.json" in conf
    assert not any(line.startswith(("password_file", "acl_file")) for line in conf)  # the plugin decides alone
    config = json.loads((out / "mosquitto/dynamic-security.json").read_text())
    bound = {c["username"]: c["clientid"] for c in config["clients"]}  # dynsec refuses any other client id
    assert bound == {"dev-a": "splitglm-device-dev-a", "dev-a$sensors": "splitglm-sensors-dev-a",
                     "dev-a$app": "splitglm-app-dev-a", "edge-a": "splitglm-edge-edge-a",
                     "broker$health": "splitglm-health"}


def test_without_the_plugin_it_warns_that_client_ids_are_not_bound(tmp_path, caplog):
    make_secrets(tmp_path / "s", ["dev-a"], ["edge-a"], mosquitto_plugin=None)
    assert "bind no client id" in caplog.text
    assert "NOT bound" in (tmp_path / "s/mosquitto/mosquitto.conf").read_text()


def test_dynamic_security_roles_are_the_acl_with_each_login_substituted():
    acl = ("pattern readwrite sensors/%u/#\npattern write f/%u\n# edges\nuser e\ntopic read f/+\n"
           "user ghost\ntopic read x\n")
    rules = acl_rules(acl, ["d1", "e"])
    assert rules == {"d1": [("readwrite", "sensors/d1/#"), ("write", "f/d1")],
                     "e": [("readwrite", "sensors/e/#"), ("write", "f/e"), ("read", "f/+")]}
    config = dynsec_config(acl, {"d1": "pw1", "e": "pw2"})
    assert config["defaultACLAccess"] == {"publishClientSend": False, "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}
    d1 = next(r for r in config["roles"] if r["rolename"] == "d1")
    assert {(a["acltype"], a["topic"]) for a in d1["acls"]} == {
        ("subscribePattern", "sensors/d1/#"), ("publishClientReceive", "sensors/d1/#"),
        ("publishClientSend", "sensors/d1/#"), ("publishClientSend", "f/d1"),
        ("subscribePattern", "$share/+/sensors/d1/#")}  # shared subscriptions are checked with their prefix
    client = next(c for c in config["clients"] if c["username"] == "d1")
    assert client["roles"] == [{"rolename": "d1"}] and client["iterations"] == PBKDF2_ITERATIONS
    assert hash_password("pw1", base64.b64decode(client["salt"])).endswith("$" + client["password"])
    with pytest.raises(ValueError, match="access must be one of"):
        acl_rules("pattern rw x/%u\n", ["d1"])


@pytest.mark.skipif(not shutil.which("mosquitto_passwd"), reason="mosquitto_passwd is not installed")
def test_hashes_agree_with_mosquitto_passwd(tmp_path):
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "alice", "s3cret pass"], check=True)
    hashed = passwd.read_text().strip().split(":", 1)[1]
    assert check_password("s3cret pass", hashed) and not check_password("s3cret", hashed)
    salt = base64.b64decode(hashed.split("$")[3])
    assert hash_password("s3cret pass", salt) == hashed  # the same bytes mosquitto_passwd writes


@pytest.mark.parametrize("devices,edges", [(["a/b"], ["e"]), (["a b"], ["e"]), (["same"], ["same"])])
def test_refuses_logins_that_cannot_be_topic_levels(tmp_path, devices, edges):
    with pytest.raises(ValueError):
        make_secrets(tmp_path / "s", devices, edges)
    assert not (tmp_path / "s").exists()
