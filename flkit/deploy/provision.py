"""Provisioning: a root CA for the project, and a startup kit for the server, each site and each admin.

Layout of the output folder (the server and ``flkit status`` read it, so it is fixed)::

    ca/          the provisioner's private folder (mode 0700), never shipped:
                 ca.crt, ca.key (0600), project.yml (the current project), state.json
    server/      rootCA.pem, cert.pem, key.pem (0600), kit.json, crl.pem, participants.json
    <site>/      rootCA.pem, cert.pem, key.pem (0600), kit.json       (same for each admin)

``ca/`` is kept so that sites can be added and revoked later without re-provisioning: a site added
gets a certificate from the same CA, so nobody else needs a new kit, and the server's
``crl.pem`` and ``participants.json`` are replaced atomically, so a running server can re-read them
without a restart. Keys are EC P-256: fast to make, and accepted by every TLS stack gRPC uses.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flkit.deploy.kit import (
    CA_CERT,
    CERT,
    CRL,
    KEY,
    KIT_JSON,
    PARTICIPANTS,
    check_validity,
    load_certificate,
    load_crl,
    read_json_object,
)
from flkit.deploy.project import CA_DIR, SERVER_NAME, Project, Role, check_name, load_project
from flkit.errors import ConfigError

CA_CRT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
PROJECT_FILE = "project.yml"
STATE_FILE = "state.json"
# Certificates start a few minutes in the past, so a machine whose clock lags a little accepts them.
CLOCK_SKEW = timedelta(minutes=5)
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644


@dataclass(frozen=True)
class ProvisionResult:
    """What :func:`provision` wrote: the CA folder and each participant's kit folder (server first)."""

    out_dir: Path
    project: Project
    ca_dir: Path
    kits: Mapping[str, Path]
    not_after: datetime


@dataclass(frozen=True)
class _State:
    """``ca/state.json``: the serial issued to each name, the revoked ones, the next CRL number."""

    issued: dict[str, str] = field(default_factory=dict)
    revoked: dict[str, str] = field(default_factory=dict)
    next_crl_number: int = 1

    def to_json(self) -> str:
        return json.dumps({"revoked": self.revoked, "issued": self.issued,
                           "next_crl_number": self.next_crl_number}, indent=2) + "\n"


@dataclass(frozen=True)
class _Authority:
    """The loaded ``ca/`` folder: everything needed to issue certificates and CRLs."""

    out_dir: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    project: Project
    state: _State


def provision(project_path: str | Path, out_dir: str | Path, *, force: bool = False) -> ProvisionResult:
    """Create the project's root CA and every participant's startup kit in ``out_dir``.

    Refuses an ``out_dir`` that already holds a ``ca/`` folder unless ``force``: a new CA would
    invalidate every kit already handed out (use :func:`add_site` or :func:`revoke` instead). With
    ``force``, the old ``ca/`` and kit folders are removed first. ``ca/`` is written last, so an
    interrupted run can simply be run again.
    """
    return provision_project(load_project(project_path), out_dir, force=force)


def provision_project(project: Project, out_dir: str | Path, *, force: bool = False) -> ProvisionResult:
    """``provision`` for a project already checked (``parse_project``): e.g. the throwaway kits a
    run on one host makes for itself (``PocEnv``, ``simulate(tls=True)``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output folder {out} is a file")
    if (out / CA_DIR).exists():
        if not force:
            raise ConfigError(f"{out} already holds a provisioned project ({out / CA_DIR}); add a site with "
                              f"`flkit provision -o {out} --add-site NAME`, revoke one with `--revoke NAME`, or "
                              "start over with --force (every kit handed out so far stops working)")
        _remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    now = _now()
    ca_key = _new_key()
    authority = _Authority(out, _make_ca(project, ca_key, now), ca_key, project, _State())
    kits: dict[str, Path] = {}
    issued: dict[str, str] = {}
    for name, role in project.participants():
        kits[name], serial = _issue_kit(authority, name, role, now)
        issued[name] = format(serial, "x")
    authority = replace(authority, state=_State(issued=issued, next_crl_number=2))
    _write_server_lists(authority, _make_crl(authority, {}, 1, now))
    _write_ca(authority)
    return ProvisionResult(out_dir=out, project=project, ca_dir=out / CA_DIR, kits=kits,
                           not_after=_leaf_not_after(authority, now))


def add_site(out_dir: str | Path, name: str) -> Path:
    """Issue a kit for a new site with the project's CA and return its folder.

    Updates ``ca/project.yml``, ``ca/state.json`` and the server's ``participants.json``; nobody
    else needs a new kit, and a running server picks the site up by re-reading participants.json.
    """
    with _locked(Path(out_dir)) as authority:
        name = check_name(name, "site name")
        _refuse_taken(authority, name)
        project = authority.project.with_site(name)
        authority = replace(authority, project=project)
        kit, serial = _issue_kit(authority, name, "site", _now())
        issued = authority.state.issued | {name: format(serial, "x")}
        authority = replace(authority, state=replace(authority.state, issued=issued))
        _write_file(authority.out_dir / CA_DIR / STATE_FILE, authority.state.to_json().encode(), PRIVATE_FILE)
        _write_file(authority.out_dir / CA_DIR / PROJECT_FILE, project.to_yaml().encode(), PRIVATE_FILE)
        _write_participants(authority)
        return kit


def revoke(out_dir: str | Path, name: str) -> Path:
    """Revoke a site's or an admin's certificate; returns the server kit's rewritten ``crl.pem``.

    A new CRL (next CRL number) lists every revoked serial; it and ``participants.json`` are
    replaced atomically, so a running server stops accepting the participant without a restart.
    """
    with _locked(Path(out_dir)) as authority:
        role = _known_role(authority, name)
        if role == "server":
            raise ConfigError("the server's certificate cannot be revoked (every site would lose it); re-provision "
                              "with `flkit provision --project FILE -o DIR --force`, or renew it with --renew server")
        state = authority.state
        if name in state.revoked:
            raise ConfigError(f"{name} is already revoked (serial {state.revoked[name]})")
        if name not in state.issued:
            raise ConfigError(f"{authority.out_dir / CA_DIR / STATE_FILE} has no certificate issued to {name}")
        now = _now()
        dates = _revocation_dates(authority)
        serials = {int(s, 16): dates.get(int(s, 16), now) for s in [*state.revoked.values(), state.issued[name]]}
        crl = _make_crl(authority, serials, state.next_crl_number, now)
        state = replace(state, revoked=state.revoked | {name: state.issued[name]},
                        next_crl_number=state.next_crl_number + 1)
        authority = replace(authority, state=state)
        _write_server_lists(authority, crl)  # before state.json: a crash in between can be revoked again
        _write_file(authority.out_dir / CA_DIR / STATE_FILE, state.to_json().encode(), PRIVATE_FILE)
        return authority.out_dir / SERVER_NAME / CRL


def renew(out_dir: str | Path, name: str) -> Path:
    """Issue a fresh certificate and key (new serial, ``valid_days`` from now) for a participant.

    For a certificate about to expire: only that participant's kit changes, the old certificate
    stays valid until it expires. A revoked participant cannot be renewed (add it under a new name).
    """
    with _locked(Path(out_dir)) as authority:
        role = _known_role(authority, name)
        if name in authority.state.revoked:
            raise ConfigError(f"{name} is revoked; add it again under a new name with --add-site")
        kit, serial = _issue_kit(authority, name, role, _now())
        issued = authority.state.issued | {name: format(serial, "x")}
        state = replace(authority.state, issued=issued)
        _write_file(authority.out_dir / CA_DIR / STATE_FILE, state.to_json().encode(), PRIVATE_FILE)
        return kit


# -- certificates ---------------------------------------------------------------------------------------


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _make_ca(project: Project, key: ec.EllipticCurvePrivateKey, now: datetime) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{project.name} root CA"),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, project.name)])
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now - CLOCK_SKEW)
               .not_valid_after(now + timedelta(days=project.ca_valid_days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(ca=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return builder.sign(key, hashes.SHA256())


def _issue(authority: _Authority, name: str, role: Role, key: ec.EllipticCurvePrivateKey,
           now: datetime) -> x509.Certificate:
    """A participant's certificate: CN = name, O = project, OU = role, signed by the CA."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, authority.project.name),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role)])
    usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH] if role == "server" \
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    ca_key_id = x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key())
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(authority.cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - CLOCK_SKEW).not_valid_after(_leaf_not_after(authority, now))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(_key_usage(ca=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(_alt_names(authority.project, name, role), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(ca_key_id, critical=False))
    return builder.sign(authority.key, hashes.SHA256())


def _leaf_not_after(authority: _Authority, now: datetime) -> datetime:
    """``valid_days`` from now, but never past the CA's own expiry (such a certificate would not verify)."""
    return min(now + timedelta(days=authority.project.valid_days), authority.cert.not_valid_after_utc)


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _alt_names(project: Project, name: str, role: Role) -> x509.SubjectAlternativeName:
    """The server: every name it is reached by (TLS checks these, not the CN). Others: their name."""
    if role != "server":
        return x509.SubjectAlternativeName([x509.DNSName(name)])
    hosts = [project.server_host, *project.server_names, "localhost", "127.0.0.1"]
    unique = list(dict.fromkeys(_normal_host(h) for h in hosts))
    return x509.SubjectAlternativeName([_general_name(h) for h in unique])


def _normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _make_crl(authority: _Authority, revoked: Mapping[int, datetime], number: int,
              now: datetime) -> x509.CertificateRevocationList:
    """A CRL listing ``revoked`` (serial -> date), valid until the CA expires: it is replaced, not renewed."""
    builder = (x509.CertificateRevocationListBuilder().issuer_name(authority.cert.subject).last_update(now)
               .next_update(authority.cert.not_valid_after_utc)
               .add_extension(x509.CRLNumber(number), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(authority.key.public_key()),
                              critical=False))
    for serial, when in sorted(revoked.items()):
        entry = x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        builder = builder.add_revoked_certificate(entry)
    return builder.sign(authority.key, hashes.SHA256())


def _revocation_dates(authority: _Authority) -> dict[int, datetime]:
    """The dates in the current CRL, so each revoked serial keeps the date it was first revoked on."""
    path = authority.out_dir / SERVER_NAME / CRL
    try:
        crl = load_crl(path.read_bytes(), authority.cert, path)
    except (OSError, ConfigError):
        return {}  # rebuilt from state.json with today's date
    return {entry.serial_number: entry.revocation_date_utc for entry in crl}


# -- files ------------------------------------------------------------------------------------------------


def _issue_kit(authority: _Authority, name: str, role: Role, now: datetime) -> tuple[Path, int]:
    """Write a participant's kit folder (the four kit files); returns it and the certificate's serial."""
    key = _new_key()
    cert = _issue(authority, name, role, key, now)
    folder = authority.out_dir / name
    _make_dir(folder)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_file(folder / KEY, key_pem, PRIVATE_FILE)
    _write_file(folder / CERT, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE)
    _write_file(folder / CA_CERT, authority.cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE)
    meta = {"project": authority.project.name, "name": name, "role": role,
            "server": authority.project.server_address, "not_after": cert.not_valid_after_utc.isoformat()}
    _write_file(folder / KIT_JSON, (json.dumps(meta, indent=2) + "\n").encode(), PUBLIC_FILE)
    return folder, cert.serial_number


def _write_ca(authority: _Authority) -> None:
    ca_dir = authority.out_dir / CA_DIR
    _make_dir(ca_dir)
    key_pem = authority.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())
    _write_file(ca_dir / CA_KEY_FILE, key_pem, PRIVATE_FILE)
    _write_file(ca_dir / CA_CRT_FILE, authority.cert.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE)
    _write_file(ca_dir / PROJECT_FILE, authority.project.to_yaml().encode(), PRIVATE_FILE)
    _write_file(ca_dir / STATE_FILE, authority.state.to_json().encode(), PRIVATE_FILE)


def _write_server_lists(authority: _Authority, crl: x509.CertificateRevocationList) -> None:
    """The two files a running server re-reads: the CRL, and who takes part."""
    _write_file(authority.out_dir / SERVER_NAME / CRL, crl.public_bytes(serialization.Encoding.PEM), PUBLIC_FILE)
    _write_participants(authority)


def _write_participants(authority: _Authority) -> None:
    revoked = authority.state.revoked
    data = {"sites": [s for s in authority.project.sites if s not in revoked],
            "admins": [a for a in authority.project.admins if a not in revoked],
            "workers": [w for w in authority.project.workers if w not in revoked],
            "revoked": list(revoked)}
    path = authority.out_dir / SERVER_NAME / PARTICIPANTS
    _write_file(path, (json.dumps(data, indent=2) + "\n").encode(), PUBLIC_FILE)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename): a reader sees the old file or the new one, never half.

    The temp file is created with ``mode`` already set, so a key is never readable by others,
    not even for a moment.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if mode == PRIVATE_FILE:
            os.fchmod(fd, mode)  # exactly 0600 whatever the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _make_dir(path: Path) -> None:
    path.mkdir(mode=PRIVATE_DIR, exist_ok=True)
    os.chmod(path, PRIVATE_DIR)


def _remove_previous(out: Path) -> None:
    """For --force: remove ``ca/`` and the kit folders (those with a kit.json), nothing else."""
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink() and (child.name == CA_DIR or (child / KIT_JSON).is_file()):
            shutil.rmtree(child)


# -- loading the CA folder ------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[_Authority]:
    """Load ``ca/`` under an exclusive lock, so two provisioning commands never interleave."""
    ca_dir = out / CA_DIR
    if not ca_dir.is_dir():
        raise ConfigError(f"{out} has no {CA_DIR}/ folder: provision the project first with "
                          f"`flkit provision --project project.yml -o {out}`")
    fd = os.open(ca_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield _load_authority(out)
    finally:
        os.close(fd)  # releases the lock


def _load_authority(out: Path) -> _Authority:
    ca_dir = out / CA_DIR
    for name in (CA_CRT_FILE, CA_KEY_FILE, PROJECT_FILE, STATE_FILE):
        if not (ca_dir / name).is_file():
            raise ConfigError(f"{ca_dir} has no {name}; it was not written by `flkit provision` or was damaged")
    cert = load_certificate((ca_dir / CA_CRT_FILE).read_bytes(), ca_dir / CA_CRT_FILE)
    check_validity(cert, "the project's root CA", _now(),
                   "re-provision with `flkit provision --project FILE -o DIR --force` and install the new kits")
    try:
        key = serialization.load_pem_private_key((ca_dir / CA_KEY_FILE).read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{ca_dir / CA_KEY_FILE} is not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_dir / CA_KEY_FILE} is not an EC key")
    return _Authority(out, cert, key, load_project(ca_dir / PROJECT_FILE), _load_state(ca_dir / STATE_FILE))


def _load_state(path: Path) -> _State:
    data = read_json_object(path)
    issued, revoked, number = _serial_map(data.get("issued")), _serial_map(data.get("revoked")), \
        data.get("next_crl_number")
    if issued is None or revoked is None or isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ConfigError(f"{path}: expected issued and revoked (name -> hex serial) and next_crl_number")
    return _State(issued=issued, revoked=revoked, next_crl_number=number)


def _serial_map(value: object) -> dict[str, str] | None:
    """``{name: hex serial}``, or None when ``value`` is not one."""
    if not isinstance(value, dict):
        return None
    result: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not isinstance(v, str):
            return None
        try:
            int(v, 16)
        except ValueError:
            return None
        result[k] = v
    return result


def _known_role(authority: _Authority, name: str) -> Role:
    role = authority.project.role_of(name)
    if role is None:
        project = authority.project
        raise ConfigError(f"{name!r} is not a participant of project {project.name} (sites: "
                          f"{', '.join(project.sites)}; admins: {', '.join(project.admins) or 'none'})")
    return role


def _refuse_taken(authority: _Authority, name: str) -> None:
    for other, role in authority.project.participants():
        if other.lower() == name.lower():
            revoked = " (revoked; a revoked name is not reused)" if other in authority.state.revoked else ""
            raise ConfigError(f"site name {name!r} is already taken by {role} {other!r}{revoked}; pick another name")
    if name.lower() == CA_DIR:
        raise ConfigError(f"site name {name!r} is the CA's folder; pick another name")


def _now() -> datetime:
    return datetime.now(timezone.utc)
