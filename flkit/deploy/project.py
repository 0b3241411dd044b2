"""The project file: who takes part in a federated project, and where its server listens.

Minimal form (YAML)::

    name: demo
    server: {host: localhost, port: 8002}
    sites: [site-1, site-2]
    admins: [admin]

Optional: ``server.names`` (more DNS names or IP addresses the server is reached by, all put in its
certificate), ``valid_days`` (participants' certificates, default 365) and ``ca_valid_days`` (the
root CA, default 3650).

Every name becomes a folder name and a certificate's common name, so names are checked strictly
here, once, with errors that name the field: a name such as ``../x`` would otherwise write a key
outside the output folder.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from flkit.errors import ConfigError

# "worker": a simulator's pool worker, which runs many pooled sites' tasks over one connection
# (its certificate may act only for sessions the simulator's pool opened, never join as a site).
Role = Literal["server", "site", "admin", "worker"]

#: The server's participant name: its kit folder and its certificate's common name.
SERVER_NAME = "server"
#: The provisioner's private folder in the output folder; no participant may be called this.
CA_DIR = "ca"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A DNS name (a leading "*." wildcard allowed; underscores too, as container hostnames have them).
HOST_RE = re.compile(r"^(\*\.)?[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})$")

DEFAULT_VALID_DAYS = 365
DEFAULT_CA_VALID_DAYS = 3650
_TOP_KEYS = frozenset({"name", "server", "sites", "admins", "workers", "valid_days", "ca_valid_days"})
_SERVER_KEYS = frozenset({"host", "port", "names"})


@dataclass(frozen=True)
class Project:
    """A checked project file. Build one with :func:`load_project` or :func:`parse_project`."""

    name: str
    server_host: str
    server_port: int
    server_names: tuple[str, ...]
    sites: tuple[str, ...]
    admins: tuple[str, ...]
    valid_days: int = DEFAULT_VALID_DAYS
    ca_valid_days: int = DEFAULT_CA_VALID_DAYS
    workers: tuple[str, ...] = ()

    @property
    def server_address(self) -> str:
        """``host:port`` as a gRPC target (an IPv6 host in brackets)."""
        host = f"[{self.server_host}]" if _is_ipv6(self.server_host) else self.server_host
        return f"{host}:{self.server_port}"

    def participants(self) -> Iterator[tuple[str, Role]]:
        """Every participant, server first, with its role: the kits to write."""
        yield SERVER_NAME, "server"
        for site in self.sites:
            yield site, "site"
        for admin in self.admins:
            yield admin, "admin"
        for worker in self.workers:
            yield worker, "worker"

    def role_of(self, name: str) -> Role | None:
        """The participant's role, or None for a name that is not in the project."""
        return next((role for n, role in self.participants() if n == name), None)

    def with_site(self, name: str) -> Project:
        """This project plus one site, checked like a project file (so duplicates are refused)."""
        return parse_project(self.to_dict() | {"sites": [*self.sites, name]})

    def to_dict(self) -> dict[str, object]:
        """The project file's content; :func:`parse_project` turns it back into this project."""
        server: dict[str, object] = {"host": self.server_host, "port": self.server_port}
        if self.server_names:
            server["names"] = list(self.server_names)
        out: dict[str, object] = {"name": self.name, "server": server, "sites": list(self.sites),
                                  "admins": list(self.admins)}
        if self.workers:
            out["workers"] = list(self.workers)
        return out | {"valid_days": self.valid_days, "ca_valid_days": self.ca_valid_days}

    def to_yaml(self) -> str:
        """The project file's text, in the order a person would write it."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)


def load_project(path: str | Path) -> Project:
    """Read and check a project file; a :class:`ConfigError` names the file and the field at fault."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the project file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"project file {path} is not valid YAML: {exc}") from None
    try:
        return parse_project(data)
    except ConfigError as exc:
        raise ConfigError(f"project file {path}: {exc}") from None


def parse_project(data: object) -> Project:
    """Check the content of a project file (a mapping) and build the :class:`Project`."""
    top = _mapping(data, "the project file", _TOP_KEYS)
    server = _mapping(top.get("server"), "server", _SERVER_KEYS)
    project = Project(
        name=check_name(top.get("name"), "name"),
        server_host=_host(server.get("host"), "server.host"),
        server_port=_int(server.get("port"), "server.port", 1, 65535),
        server_names=tuple(_host(n, f"server.names[{i}]") for i, n in enumerate(_list(server.get("names"),
                                                                                         "server.names"))),
        sites=tuple(check_name(n, f"sites[{i}]") for i, n in enumerate(_list(top.get("sites"), "sites"))),
        admins=tuple(check_name(n, f"admins[{i}]") for i, n in enumerate(_list(top.get("admins"), "admins"))),
        valid_days=_int(top.get("valid_days", DEFAULT_VALID_DAYS), "valid_days", 1, 100 * 365),
        ca_valid_days=_int(top.get("ca_valid_days", DEFAULT_CA_VALID_DAYS), "ca_valid_days", 1, 100 * 365),
        workers=tuple(check_name(n, f"workers[{i}]") for i, n in enumerate(_list(top.get("workers"), "workers"))),
    )
    if not project.sites and not project.workers:
        raise ConfigError("sites: a project needs at least one site")
    if project.ca_valid_days < project.valid_days:
        raise ConfigError(f"ca_valid_days ({project.ca_valid_days}) is shorter than valid_days "
                          f"({project.valid_days}): certificates would outlive the CA that signs them")
    _check_unique(project)
    return project


def check_name(value: object, field: str) -> str:
    """A participant or project name: safe as a folder name and as a certificate common name."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{field}: expected a non-empty name, got {value!r}")
    if "/" in value or "\\" in value or ".." in value:
        raise ConfigError(f"{field}: {value!r} looks like a path; names may not contain '/', '\\' or '..'")
    if len(value) > 64:
        raise ConfigError(f"{field}: {value[:20]!r}... is {len(value)} characters long; at most 64 are allowed")
    if not NAME_RE.fullmatch(value):
        raise ConfigError(f"{field}: {value!r} is not a valid name (letters, digits, '.', '_' and '-', "
                          "starting with a letter or digit)")
    return value


def _check_unique(project: Project) -> None:
    """Names are folder names: refuse duplicates, case-insensitively (some file systems fold case)."""
    seen: dict[str, str] = {CA_DIR: "the CA folder"}
    for name, role in project.participants():
        what = "the server" if role == "server" else f"{role} {name!r}"
        other = seen.get(name.lower())
        if other is not None:
            raise ConfigError(f"{role}s: {name!r} clashes with {other}; every name must be unique "
                              "(ignoring case: names become folder names)")
        seen[name.lower()] = what


def _mapping(value: object, field: str, allowed: frozenset[str]) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field}: expected a mapping, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ConfigError(f"{field}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
    return {str(k): v for k, v in value.items()}


def _list(value: object, field: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{field}: expected a list, got {type(value).__name__}")
    return value


def _int(value: object, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{field}: expected a whole number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{field}: {value} is out of range {low}..{high}")
    return value


def _host(value: object, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{field}: expected a host name or IP address, got {value!r}")
    if _is_ip(value):
        return value
    if ".." in value or not HOST_RE.fullmatch(value):
        raise ConfigError(f"{field}: {value!r} is neither an IP address nor a DNS name")
    return value


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ipv6(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).version == 6

