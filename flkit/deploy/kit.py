"""Reading a startup kit: the folder ``flkit provision`` wrote for one participant.

A kit holds ``rootCA.pem`` (the project's CA), ``cert.pem`` and ``key.pem`` (the participant's
certificate and private key) and ``kit.json`` (project, name, role, server address, expiry); the
server's kit also holds ``crl.pem`` and ``participants.json``, which provisioning rewrites when a
site is added or revoked. Everything is checked when a kit is loaded, so that a wrong or expired kit
fails at start-up with a sentence that says what to do, not later as a TLS handshake error.
"""

from __future__ import annotations

import json
import logging
import stat
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flkit.deploy.project import Role
from flkit.errors import ConfigError

log = logging.getLogger(__name__)

CA_CERT = "rootCA.pem"
CERT = "cert.pem"
KEY = "key.pem"
KIT_JSON = "kit.json"
#: Only in the server's kit: the CA's list of revoked certificates, and who takes part.
CRL = "crl.pem"
PARTICIPANTS = "participants.json"
KIT_FILES = (CA_CERT, CERT, KEY, KIT_JSON)
ROLES: tuple[Role, ...] = ("server", "site", "admin", "worker")

_HINT = "create the kits with `flkit provision --project project.yml -o kits/` and copy the participant's folder"


@dataclass(frozen=True)
class Kit:
    """A participant's checked startup kit: PEM bytes ready for ``grpc.ssl_*_credentials``."""

    path: Path
    project: str
    name: str
    role: Role
    server: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    not_after: datetime

    def days_left(self, now: datetime | None = None) -> int:
        """Whole days until the certificate expires (negative once it has): for warnings and status."""
        return (self.not_after - (now or _now())).days


class CertificateInfo(TypedDict):
    """What ``flkit status`` shows of a certificate."""

    name: str
    role: str
    project: str
    serial: str
    not_before: datetime
    not_after: datetime


def load_kit(path: str | Path) -> Kit:
    """Read and check the kit in ``path``; a :class:`ConfigError` says what is wrong and how to fix it.

    Checked: the files are there, the certificate is signed by the kit's CA, belongs to the name in
    kit.json and to key.pem, and is valid now (as is the CA). A key readable by others only warns:
    the kit still works, but the key should be protected.
    """
    folder = Path(path)
    _require_files(folder, KIT_FILES)
    meta = _read_kit_json(folder / KIT_JSON)
    name = meta["name"]
    ca_pem, cert_pem = (folder / CA_CERT).read_bytes(), (folder / CERT).read_bytes()
    ca, cert = load_certificate(ca_pem, folder / CA_CERT), load_certificate(cert_pem, folder / CERT)
    check_issued_by(cert, ca, f"{folder / CERT}")
    if common_name(cert) != name:
        raise ConfigError(f"{folder / CERT} is the certificate of {common_name(cert)!r}, but {KIT_JSON} says this "
                          f"kit is {name!r}; reinstall the participant's kit folder as provisioned")
    _warn_if_readable(folder / KEY)
    key_pem = (folder / KEY).read_bytes()
    _check_key_matches(key_pem, cert, folder)
    now = _now()
    check_validity(ca, f"the root CA of project {meta['project']}", now,
                   "re-provision the project (`flkit provision --project FILE -o DIR --force`) and install the new kits")
    check_validity(cert, name, now)
    return Kit(path=folder, project=meta["project"], name=name, role=_role(meta["role"], folder),
               server=meta["server"], ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem,
               not_after=cert.not_valid_after_utc)


def read_participant_lists(server_kit_path: str | Path) -> dict[str, list[str]]:
    """The server kit's ``participants.json``: its lists of ``sites``, ``admins``, ``workers``
    (absent in kits without simulator workers: empty) and ``revoked`` names.

    Read again by a running server when the file changes, so a site added or revoked with
    ``flkit provision`` takes effect without a restart.
    """
    path = Path(server_kit_path) / PARTICIPANTS
    _require_files(path.parent, (PARTICIPANTS,))
    data = read_json_object(path, "with sites, admins and revoked")
    return {key: _names(data.get(key, [] if key == "workers" else None), f"{path}: {key}")
            for key in ("sites", "admins", "workers", "revoked")}


def read_participants(server_kit_path: str | Path) -> tuple[list[str], list[str], list[str]]:
    """The server kit's (sites, admins, revoked names); see ``read_participant_lists``."""
    lists = read_participant_lists(server_kit_path)
    return lists["sites"], lists["admins"], lists["revoked"]


def read_revoked_serials(server_kit_path: str | Path) -> set[int]:
    """The serial numbers in the server kit's ``crl.pem``, after checking the CA signed it.

    A CRL that is missing, unreadable or not signed by the kit's CA is a :class:`ConfigError`: a
    server that silently ignored it would let revoked sites back in.
    """
    folder = Path(server_kit_path)
    _require_files(folder, (CA_CERT, CRL))
    ca = load_certificate((folder / CA_CERT).read_bytes(), folder / CA_CERT)
    return {entry.serial_number for entry in load_crl((folder / CRL).read_bytes(), ca, folder / CRL)}


def certificate_info(pem: bytes) -> CertificateInfo:
    """Name, role, project, serial (hex) and validity of a PEM certificate, for ``flkit status``."""
    cert = load_certificate(pem, Path("<certificate>"))
    return CertificateInfo(name=common_name(cert), role=_attribute(cert.subject, NameOID.ORGANIZATIONAL_UNIT_NAME),
                           project=_attribute(cert.subject, NameOID.ORGANIZATION_NAME),
                           serial=format(cert.serial_number, "x"), not_before=cert.not_valid_before_utc,
                           not_after=cert.not_valid_after_utc)


def load_certificate(pem: bytes, path: Path) -> x509.Certificate:
    """Parse a PEM certificate; a damaged file is a :class:`ConfigError` naming it."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate ({exc}); re-provision or reinstall the kit") from None


def load_crl(pem: bytes, ca: x509.Certificate, path: Path) -> x509.CertificateRevocationList:
    """Parse a PEM CRL and check that ``ca`` issued and signed it."""
    try:
        crl = x509.load_pem_x509_crl(pem)
    except ValueError as exc:
        raise ConfigError(f"{path} is not a PEM certificate revocation list ({exc})") from None
    public_key = ca.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):  # flkit's CAs have EC P-256 keys
        raise ConfigError(f"the CA that should have signed {path} has no EC key; re-provision the project")
    if crl.issuer != ca.subject or not crl.is_signature_valid(public_key):
        raise ConfigError(f"{path} is not signed by this project's CA; copy crl.pem again from the "
                          "provisioner's output (flkit provision -o DIR writes it into DIR/server)")
    return crl


def check_issued_by(cert: x509.Certificate, ca: x509.Certificate, what: str) -> None:
    """Refuse a certificate the CA did not sign (a kit mixed from two provisioning runs)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(f"{what} is not signed by the kit's {CA_CERT}: the files come from different "
                          "provisioning runs; reinstall the whole kit folder") from None


def check_validity(cert: x509.Certificate, who: str, now: datetime, fix: str | None = None) -> None:
    """Refuse an expired or not yet valid certificate, saying when and what to run."""
    if now > cert.not_valid_after_utc:
        fix = fix or f"run `flkit provision -o DIR --renew {who}` (or re-provision) and install the new kit"
        raise ConfigError(f"certificate of {who} expired on {_day(cert.not_valid_after_utc)}; {fix}")
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"certificate of {who} is not valid before {_day(cert.not_valid_before_utc)}; "
                          "check this machine's clock")


def common_name(cert: x509.Certificate) -> str:
    """The subject's CN: the participant's name."""
    return _attribute(cert.subject, NameOID.COMMON_NAME)


def _attribute(name: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = name.get_attributes_for_oid(oid)
    if not values:
        return ""
    value = values[0].value
    return value.decode() if isinstance(value, bytes) else value


def _require_files(folder: Path, names: tuple[str, ...]) -> None:
    if not folder.is_dir():
        raise ConfigError(f"kit folder {folder} does not exist; {_HINT}")
    for name in names:
        if not (folder / name).is_file():
            raise ConfigError(f"kit folder {folder} has no {name}; {_HINT}")


def read_json_object(path: Path, what: str = "") -> dict[str, Any]:
    """A JSON object from ``path``, or a ConfigError naming the file (``what``: what it should hold)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object{' ' + what if what else ''}")
    return data


def _read_kit_json(path: Path) -> dict[str, str]:
    data = read_json_object(path)
    for key in ("project", "name", "role", "server", "not_after"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise ConfigError(f"{path}: missing or empty field {key!r}; reinstall the kit")
    return {str(k): str(v) for k, v in data.items()}


def _role(value: str, folder: Path) -> Role:
    for role in ROLES:
        if value == role:
            return role
    raise ConfigError(f"{folder / KIT_JSON}: role {value!r} is not one of {', '.join(ROLES)}")


def _names(value: object, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what}: expected a list of names")
    return [str(v) for v in value]


def _check_key_matches(key_pem: bytes, cert: x509.Certificate, folder: Path) -> None:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{folder / KEY} is not an unencrypted PEM private key ({exc})") from None
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != cert.public_key().public_bytes(der, spki):
        raise ConfigError(f"{folder / KEY} is not the key of {folder / CERT}; reinstall the whole kit folder")


def _warn_if_readable(key: Path) -> None:
    mode = key.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by other users (mode %o); protect it with `chmod 600 %s`",
                    key, stat.S_IMODE(mode), key)


def _day(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M UTC")


def _now() -> datetime:
    return datetime.now(timezone.utc)
