"""`flkit provision`: the root CA, the startup kits and their later changes, with real files and real crypto.

The layout checked here is the contract the server's TLS code reads (flkit.deploy.provision's
docstring), so it is pinned file by file.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flkit.cli import main
from flkit.deploy.kit import certificate_info, load_kit, read_participants, read_revoked_serials
from flkit.deploy.project import load_project, parse_project
from flkit.deploy.provision import add_site, provision, renew, revoke
from flkit.errors import ConfigError

from conftest import REPO

MINIMAL = """\
name: demo
server: {host: localhost, port: 8002}
sites: [site-1, site-2]
admins: [admin]
"""
PARTICIPANTS = {"server": "server", "site-1": "site", "site-2": "site", "admin": "admin"}
KIT_FILES = {"rootCA.pem", "cert.pem", "key.pem", "kit.json"}


def _project(tmp_path: Path, text: str = MINIMAL) -> Path:
    path = tmp_path / "project.yml"
    path.write_text(text)
    return path


@pytest.fixture
def kits(tmp_path: Path) -> Path:
    out = tmp_path / "kits"
    provision(_project(tmp_path), out)
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(kits: Path) -> x509.CertificateRevocationList:
    crl = x509.load_pem_x509_crl((kits / "server" / "crl.pem").read_bytes())
    assert crl.is_signature_valid(_cert(kits / "ca" / "ca.crt").public_key())
    return crl


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _attr(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> str:
    return cert.subject.get_attributes_for_oid(oid)[0].value


# -- the layout ------------------------------------------------------------------------------------------


def test_provisioning_writes_the_documented_layout(kits):
    assert {p.name for p in kits.iterdir()} == {"ca", *PARTICIPANTS}
    assert {p.name for p in (kits / "ca").iterdir()} == {"ca.crt", "ca.key", "project.yml", "state.json"}
    assert _mode(kits / "ca") == 0o700
    assert {p.name for p in (kits / "server").iterdir()} == KIT_FILES | {"crl.pem", "participants.json"}
    for name, role in PARTICIPANTS.items():
        if role != "server":
            assert {p.name for p in (kits / name).iterdir()} == KIT_FILES
        meta = json.loads((kits / name / "kit.json").read_text())
        assert meta["project"] == "demo" and meta["name"] == name and meta["role"] == role
        assert meta["server"] == "localhost:8002"
        assert datetime.fromisoformat(meta["not_after"]) == _cert(kits / name / "cert.pem").not_valid_after_utc
        assert (kits / name / "rootCA.pem").read_bytes() == (kits / "ca" / "ca.crt").read_bytes()
    state = json.loads((kits / "ca" / "state.json").read_text())
    assert state["revoked"] == {} and state["next_crl_number"] >= 1
    assert state["issued"] == {n: format(_cert(kits / n / "cert.pem").serial_number, "x") for n in PARTICIPANTS}
    assert json.loads((kits / "server" / "participants.json").read_text()) == {
        "sites": ["site-1", "site-2"], "admins": ["admin"], "workers": [], "revoked": []}
    assert load_project(kits / "ca" / "project.yml") == parse_project(yaml.safe_load(MINIMAL))
    assert list(_crl(kits)) == []


def test_private_keys_are_readable_by_their_owner_only(kits):
    for key in [kits / "ca" / "ca.key", *(kits / name / "key.pem" for name in PARTICIPANTS)]:
        assert _mode(key) == 0o600, key
        assert isinstance(serialization.load_pem_private_key(key.read_bytes(), None), ec.EllipticCurvePrivateKey)


def test_every_certificate_is_signed_by_the_ca_and_names_its_participant(kits):
    ca = _cert(kits / "ca" / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    for name, role in PARTICIPANTS.items():
        cert = _cert(kits / name / "cert.pem")
        cert.verify_directly_issued_by(ca)
        assert (_attr(cert, NameOID.COMMON_NAME), _attr(cert, NameOID.ORGANIZATION_NAME),
                _attr(cert, NameOID.ORGANIZATIONAL_UNIT_NAME)) == (name, "demo", role)
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert ExtendedKeyUsageOID.CLIENT_AUTH in usages
        assert (ExtendedKeyUsageOID.SERVER_AUTH in usages) == (role == "server")
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"


def _alt_names(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]


def test_the_server_certificate_names_every_address_of_the_server(tmp_path, kits):
    assert _alt_names(_cert(kits / "server" / "cert.pem")) == (["localhost"], ["127.0.0.1"])
    text = MINIMAL.replace("host: localhost", "host: fl.example.org, names: [10.0.0.5, fl-alt, '::1']")
    out = provision(_project(tmp_path, text), tmp_path / "other").out_dir
    dns, ips = _alt_names(_cert(out / "server" / "cert.pem"))
    assert dns == ["fl.example.org", "fl-alt", "localhost"]
    assert ips == ["10.0.0.5", "::1", "127.0.0.1"]
    assert _alt_names(_cert(out / "site-1" / "cert.pem")) == (["site-1"], [])
    # An IP host is an IPAddress entry, and an IPv6 one is bracketed in the address the sites dial.
    text = MINIMAL.replace("host: localhost", "host: 'fd00::7'")
    out = provision(_project(tmp_path, text), tmp_path / "v6").out_dir
    assert ipaddress.ip_address("fd00::7") in _cert(out / "server" / "cert.pem").extensions \
        .get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert load_kit(out / "site-1").server == "[fd00::7]:8002"


def test_expiry_follows_valid_days(tmp_path):
    now = datetime.now(timezone.utc)
    result = provision(_project(tmp_path, MINIMAL + "valid_days: 30\nca_valid_days: 60\n"), tmp_path / "kits")
    for name in PARTICIPANTS:
        cert = _cert(result.kits[name] / "cert.pem")
        assert abs(cert.not_valid_after_utc - (now + timedelta(days=30))) < timedelta(minutes=1)
        assert cert.not_valid_before_utc <= now
    ca = _cert(result.ca_dir / "ca.crt")
    assert abs(ca.not_valid_after_utc - (now + timedelta(days=60))) < timedelta(minutes=1)
    kit = load_kit(result.kits["site-1"])
    assert kit.days_left() in (29, 30) and kit.not_after == cert.not_valid_after_utc


# -- the project file ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "message"), [
    (("port: 8002", "port: 0"), "server.port: 0 is out of range"),
    (("port: 8002", "port: 70000"), "server.port: 70000 is out of range"),
    (("port: 8002", "port: '8002'"), "server.port: expected a whole number"),
    (("host: localhost", "host: ''"), "server.host: expected a host name"),
    (("host: localhost", "host: 'a b'"), "server.host: 'a b' is neither an IP address nor a DNS name"),
    (("[site-1, site-2]", "[site-1, Site-1]"), "'Site-1' clashes with site 'site-1'"),
    (("[site-1, site-2]", "[site-1, server]"), "'server' clashes with the server"),
    (("[admin]", "[site-2]"), "'site-2' clashes with site 'site-2'"),
    (("[site-1, site-2]", "[site-1, ../x]"), "sites[1]: '../x' looks like a path"),
    (("[site-1, site-2]", "[]"), "sites: a project needs at least one site"),
    (("name: demo", "name: a/b"), "name: 'a/b' looks like a path"),
    (("name: demo", "nmae: demo"), "unknown field(s) nmae"),
    (("server: {host: localhost, port: 8002}", "server: localhost:8002"), "server: expected a mapping"),
    (("admins: [admin]", "admins: [admin]\nvalid_days: 0"), "valid_days: 0 is out of range"),
    (("admins: [admin]", "admins: [admin]\nvalid_days: 400\nca_valid_days: 300"), "ca_valid_days (300) is shorter"),
])
def test_a_bad_project_file_is_refused_naming_the_field(tmp_path, change, message):
    assert change[0] in MINIMAL
    path = _project(tmp_path, MINIMAL.replace(*change))
    with pytest.raises(ConfigError, match="project file") as info:
        provision(path, tmp_path / "kits")
    assert message in str(info.value)
    assert not (tmp_path / "kits").exists()


def test_a_missing_or_broken_project_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the project file"):
        load_project(tmp_path / "nope.yml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_project(_project(tmp_path, "name: [unclosed"))


def test_the_project_round_trips_through_yaml():
    project = parse_project(yaml.safe_load(MINIMAL.replace("port: 8002", "port: 8002, names: [h2]")))
    assert parse_project(yaml.safe_load(project.to_yaml())) == project
    assert project.server_names == ("h2",) and project.valid_days == 365 and project.ca_valid_days == 3650


# -- adding, revoking, renewing --------------------------------------------------------------------------


def test_add_site_issues_a_kit_from_the_same_ca_and_touches_no_other_kit(kits):
    before = {p: p.read_bytes() for n in PARTICIPANTS for p in (kits / n).iterdir() if p.name in KIT_FILES}
    kit = add_site(kits, "site-3")
    assert kit == kits / "site-3" and {p.name for p in kit.iterdir()} == KIT_FILES
    _cert(kit / "cert.pem").verify_directly_issued_by(_cert(kits / "ca" / "ca.crt"))
    assert _mode(kit / "key.pem") == 0o600
    assert load_kit(kit).role == "site"
    assert read_participants(kits / "server") == (["site-1", "site-2", "site-3"], ["admin"], [])
    assert load_project(kits / "ca" / "project.yml").sites == ("site-1", "site-2", "site-3")
    issued = json.loads((kits / "ca" / "state.json").read_text())["issued"]
    assert issued["site-3"] == format(_cert(kit / "cert.pem").serial_number, "x")
    assert {p: p.read_bytes() for p in before} == before


@pytest.mark.parametrize(("name", "cause"), [
    ("../x", "looks like a path"),
    ("a/b", "looks like a path"),
    ("x" * 70, "is 70 characters long"),
    ("-x", "is not a valid name"),
    ("", "expected a non-empty name"),
    ("site-1", "already taken by site 'site-1'"),
    ("SITE-1", "already taken by site 'site-1'"),
    ("server", "already taken by server 'server'"),
    ("admin", "already taken by admin 'admin'"),
    ("ca", "is the CA's folder"),
])
def test_add_site_refuses_a_bad_or_taken_name(kits, name, cause):
    before = (kits / "server" / "participants.json").read_text()
    with pytest.raises(ConfigError) as info:
        add_site(kits, name)
    assert cause in str(info.value)
    assert (kits / "server" / "participants.json").read_text() == before
    assert not (kits.parent / "x").exists()


def test_revoke_lists_the_serial_in_a_signed_crl_and_in_participants(kits):
    serial = _cert(kits / "site-2" / "cert.pem").serial_number
    assert revoke(kits, "site-2") == kits / "server" / "crl.pem"
    crl = _crl(kits)
    assert [entry.serial_number for entry in crl] == [serial]
    assert read_revoked_serials(kits / "server") == {serial}
    assert read_participants(kits / "server") == (["site-1"], ["admin"], ["site-2"])
    state = json.loads((kits / "ca" / "state.json").read_text())
    assert state["revoked"] == {"site-2": format(serial, "x")}
    first_number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    first_date = crl.get_revoked_certificate_by_serial_number(serial).revocation_date_utc

    revoke(kits, "admin")
    crl = _crl(kits)
    assert read_revoked_serials(kits / "server") == {serial, _cert(kits / "admin" / "cert.pem").serial_number}
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > first_number
    assert crl.get_revoked_certificate_by_serial_number(serial).revocation_date_utc == first_date
    assert read_participants(kits / "server") == (["site-1"], [], ["site-2", "admin"])
    with pytest.raises(ConfigError, match="already taken by site 'site-2' \\(revoked"):
        add_site(kits, "site-2")


@pytest.mark.parametrize(("name", "message"), [
    ("nobody", "'nobody' is not a participant of project demo"),
    ("server", "the server's certificate cannot be revoked"),
])
def test_revoke_refuses_unknown_names_and_the_server(kits, name, message):
    with pytest.raises(ConfigError, match=message):
        revoke(kits, name)
    assert list(_crl(kits)) == []


def test_revoking_twice_is_a_clear_error(kits):
    revoke(kits, "site-1")
    with pytest.raises(ConfigError, match="site-1 is already revoked"):
        revoke(kits, "site-1")


def test_renew_issues_a_new_certificate_and_key(kits):
    old = _cert(kits / "site-1" / "cert.pem")
    old_key = (kits / "site-1" / "key.pem").read_bytes()
    assert renew(kits, "site-1") == kits / "site-1"
    kit = load_kit(kits / "site-1")
    new = _cert(kits / "site-1" / "cert.pem")
    assert new.serial_number != old.serial_number and kit.key_pem != old_key
    assert json.loads((kits / "ca" / "state.json").read_text())["issued"]["site-1"] == format(new.serial_number, "x")
    revoke(kits, "site-2")
    with pytest.raises(ConfigError, match="site-2 is revoked"):
        renew(kits, "site-2")


def test_changes_need_a_provisioned_folder(tmp_path):
    for change in (add_site, revoke, renew):
        with pytest.raises(ConfigError, match="has no ca/ folder: provision the project first"):
            change(tmp_path, "site-9")


def test_provision_refuses_to_overwrite_unless_forced(tmp_path, kits):
    ca = (kits / "ca" / "ca.crt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a provisioned project.*--add-site.*--revoke"):
        provision(tmp_path / "project.yml", kits)
    assert (kits / "ca" / "ca.crt").read_bytes() == ca
    add_site(kits, "site-3")
    (kits / "notes.txt").write_text("mine")
    provision(tmp_path / "project.yml", kits, force=True)
    assert (kits / "ca" / "ca.crt").read_bytes() != ca
    assert not (kits / "site-3").exists(), "a kit of the replaced CA was left behind"
    assert (kits / "notes.txt").read_text() == "mine"
    load_kit(kits / "site-1")


# -- loading a kit ---------------------------------------------------------------------------------------


def test_load_kit_gives_the_checked_pems(kits):
    kit = load_kit(kits / "site-1")
    assert (kit.project, kit.name, kit.role, kit.server) == ("demo", "site-1", "site", "localhost:8002")
    assert kit.ca_pem == (kits / "ca" / "ca.crt").read_bytes()
    assert kit.cert_pem == (kits / "site-1" / "cert.pem").read_bytes()
    assert kit.key_pem == (kits / "site-1" / "key.pem").read_bytes()
    assert load_kit(kits / "server").role == "server"
    info = certificate_info(kit.cert_pem)
    assert (info["name"], info["role"], info["project"]) == ("site-1", "site", "demo")
    assert int(info["serial"], 16) == _cert(kits / "site-1" / "cert.pem").serial_number
    assert info["not_after"] == kit.not_after and info["not_before"] < kit.not_after


def _signed_copy(kits: Path, tmp_path: Path, not_before: datetime, not_after: datetime) -> Path:
    """A copy of site-1's kit whose certificate (same key, same CA) has the given validity."""
    kit = tmp_path / "copy"
    shutil.copytree(kits / "site-1", kit)
    ca_key = serialization.load_pem_private_key((kits / "ca" / "ca.key").read_bytes(), None)
    old = _cert(kit / "cert.pem")
    cert = (x509.CertificateBuilder().subject_name(old.subject).issuer_name(old.issuer).public_key(old.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(ca_key, hashes.SHA256()))
    (kit / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kit


def test_an_expired_certificate_is_refused_with_what_to_run(tmp_path, kits):
    now = datetime.now(timezone.utc)
    kit = _signed_copy(kits, tmp_path, now - timedelta(days=400), now - timedelta(days=35))
    with pytest.raises(ConfigError, match=r"certificate of site-1 expired on \d{4}-\d\d-\d\d.*flkit provision.*--renew"):
        load_kit(kit)
    shutil.rmtree(kit)
    kit = _signed_copy(kits, tmp_path, now + timedelta(days=2), now + timedelta(days=30))
    with pytest.raises(ConfigError, match="certificate of site-1 is not valid before .*clock"):
        load_kit(kit)


def test_a_broken_kit_is_refused_naming_the_cause(tmp_path, kits):
    with pytest.raises(ConfigError, match="kit folder .*nowhere does not exist.*flkit provision"):
        load_kit(tmp_path / "nowhere")
    kit = tmp_path / "copy"
    shutil.copytree(kits / "site-1", kit)
    (kit / "key.pem").unlink()
    with pytest.raises(ConfigError, match="has no key.pem.*flkit provision"):
        load_kit(kit)
    shutil.copy2(kits / "site-2" / "key.pem", kit / "key.pem")
    with pytest.raises(ConfigError, match="key.pem is not the key of"):
        load_kit(kit)
    shutil.copy2(kits / "site-1" / "key.pem", kit / "key.pem")
    meta = json.loads((kit / "kit.json").read_text())
    (kit / "kit.json").write_text(json.dumps(meta | {"name": "site-2"}))
    with pytest.raises(ConfigError, match="certificate of 'site-1', but kit.json says this kit is 'site-2'"):
        load_kit(kit)
    (kit / "kit.json").write_text(json.dumps(meta))
    other = provision(tmp_path / "project.yml", tmp_path / "other").ca_dir
    shutil.copy2(other / "ca.crt", kit / "rootCA.pem")
    with pytest.raises(ConfigError, match="not signed by the kit's rootCA.pem"):
        load_kit(kit)
    (kit / "cert.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match="cert.pem is not a PEM certificate"):
        load_kit(kit)


def test_a_key_readable_by_others_only_warns(kits, caplog):
    os.chmod(kits / "site-1" / "key.pem", 0o644)
    with caplog.at_level(logging.WARNING, logger="flkit.deploy.kit"):
        assert load_kit(kits / "site-1").name == "site-1"
    assert "readable by other users" in caplog.text and "chmod 600" in caplog.text


def test_a_crl_not_signed_by_the_ca_is_refused(tmp_path, kits):
    other = provision(tmp_path / "project.yml", tmp_path / "other").out_dir
    shutil.copy2(other / "server" / "crl.pem", kits / "server" / "crl.pem")
    with pytest.raises(ConfigError, match="crl.pem is not signed by this project's CA"):
        read_revoked_serials(kits / "server")
    (kits / "server" / "crl.pem").write_text("garbage")
    with pytest.raises(ConfigError, match="crl.pem is not a PEM certificate revocation list"):
        read_revoked_serials(kits / "server")


# -- the command -----------------------------------------------------------------------------------------


def test_the_command_provisions_adds_and_revokes(tmp_path):
    project, out = _project(tmp_path), tmp_path / "kits"
    runner = CliRunner()
    result = runner.invoke(main, ["provision", "--project", str(project), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "root CA" in result.output and all(f"kit for {name}" in result.output for name in PARTICIPANTS)
    result = runner.invoke(main, ["provision", "-o", str(out), "--add-site", "site-3"])
    assert result.exit_code == 0 and "without a restart" in result.output, result.output
    result = runner.invoke(main, ["provision", "-o", str(out), "--revoke", "site-3"])
    assert result.exit_code == 0 and "without a restart" in result.output, result.output
    assert read_participants(out / "server")[2] == ["site-3"]
    result = runner.invoke(main, ["provision", "-o", str(out), "--revoke", "site-3"])
    assert result.exit_code == 1 and "already revoked" in result.output
    result = runner.invoke(main, ["provision", "--project", str(project), "-o", str(out)])
    assert result.exit_code == 1 and "--force" in result.output
    result = runner.invoke(main, ["provision", "-o", str(out), "--add-site", "a", "--revoke", "b"])
    assert result.exit_code == 2 and "exactly one of --project, --add-site, --revoke" in result.output
    result = runner.invoke(main, ["provision", "-o", str(out), "--revoke", "site-1", "--force"])
    assert result.exit_code == 2 and "--force only goes with --project" in result.output


def test_the_command_in_a_real_process(tmp_path):
    out = tmp_path / "kits"
    proc = subprocess.run([sys.executable, "-m", "flkit.cli", "provision", "--project", str(_project(tmp_path)),
                           "-o", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {load_kit(out / name).role for name in PARTICIPANTS} == {"server", "site", "admin"}


def test_provisioning_imports_neither_torch_nor_grpc():
    code = """
import json, sys
from flkit.cli import main
try:
    main.main(args=["provision", "--help"], prog_name="flkit", standalone_mode=False)
except SystemExit:
    pass
help_modules = {name: name in sys.modules for name in ("torch", "grpc", "cryptography")}
import flkit.deploy.provision, flkit.deploy.kit
print(json.dumps([help_modules, {name: name in sys.modules for name in ("torch", "grpc")}]))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == [{"torch": False, "grpc": False, "cryptography": False},
                                                        {"torch": False, "grpc": False}]
