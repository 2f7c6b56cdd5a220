"""Tenants (``serve --tenants FILE``): which team a caller is and which jobs it may address.

A caller is identified by its bearer token or by a SAN (URI or DNS) of its verified mTLS client
certificate; each identity belongs to exactly one tenant, whose jobs are those whose id starts
with its ``job_prefix``. The file and the token files it names are re-read when they change
(as the TLS certificates are); a broken version is logged and the previous tenants keep serving.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..wire.convert import JOB_ID
from .security import FileWatch

log = logging.getLogger(__name__)

# A tenant's name is a Prometheus label value and appears in logs: short and plain.
NAME = re.compile(r"[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?")
KEYS = frozenset({"name", "token_file", "client_cert_san", "job_prefix"})
MIN_TOKEN_CHARS = 16  # as --token-file's
DEFAULT_RECHECK_S = 1.0  # how often a call may look whether the files changed
DEFAULT_GRACE_S = 600.0  # a rotated token keeps working this long (as --token-file's)


class TenantsFileError(ValueError):
    """The tenants file cannot be used; ``files`` are those it named (watched for a fix)."""

    def __init__(self, message: str, files: Sequence[Path] = ()) -> None:
        super().__init__(message)
        self.files = tuple(files)


@dataclass(frozen=True)
class Tenant:
    name: str
    job_prefix: str
    token_file: Optional[Path] = None
    sans: tuple[str, ...] = ()

    def owns(self, job_id: str) -> bool:
        return job_id.startswith(self.job_prefix)


def digest(token: bytes) -> bytes:
    """Tokens are looked up by their SHA-256: a dict lookup on a digest tells a timing observer
    nothing about the token itself."""
    return hashlib.sha256(token).digest()


@dataclass(frozen=True)
class TenantTable:
    """One consistent version of the tenants file."""

    path: Path
    tenants: tuple[Tenant, ...]
    by_token: dict[bytes, Tenant] = field(repr=False)
    by_san: dict[str, Tenant]

    @property
    def files(self) -> tuple[Path, ...]:
        return (self.path, *(t.token_file for t in self.tenants if t.token_file is not None))

    def named(self, name: str) -> Optional[Tenant]:
        return next((t for t in self.tenants if t.name == name), None)


def load_tenants(path: Path) -> TenantTable:
    """Reads and checks the tenants file and its token files. TenantsFileError (a ValueError)
    names the file, the entry and what is wrong, in one line, never a token."""
    named: list[Path] = [path]
    try:
        import yaml  # the [server] extra; only a server with --tenants needs it
    except ImportError:  # pragma: no cover - a client-only install
        raise TenantsFileError("--tenants needs PyYAML: pip install 'inforeg-regulator[server]'", named) from None
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TenantsFileError(f"cannot read tenants file {path}: {exc.strerror or exc}", named) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise TenantsFileError(f"tenants file {path} is not valid YAML{at}: {getattr(exc, 'problem', None) or exc}", named) from None
    if not isinstance(doc, dict) or set(doc) != {"tenants"} or not isinstance(doc["tenants"], list) or not doc["tenants"]:
        raise TenantsFileError(f"tenants file {path}: expected a mapping with one key, 'tenants': a non-empty list", named)
    tenants: list[Tenant] = []
    by_token: dict[bytes, Tenant] = {}
    by_san: dict[str, Tenant] = {}
    for i, entry in enumerate(doc["tenants"]):
        tenant, token = _tenant(path, i, entry, named)
        where = f"tenants file {path}: tenant {tenant.name!r}"
        if any(t.name == tenant.name for t in tenants):
            raise TenantsFileError(f"{where} is named twice", named)
        for other in tenants:
            if tenant.job_prefix.startswith(other.job_prefix) or other.job_prefix.startswith(tenant.job_prefix):
                raise TenantsFileError(
                    f"{where}: job_prefix {tenant.job_prefix!r} overlaps tenant {other.name!r}'s "
                    f"{other.job_prefix!r} (a job would belong to both)", named,
                )
        if token is not None:
            key = digest(token)
            if key in by_token:
                raise TenantsFileError(f"{where}: its token_file holds the token of tenant {by_token[key].name!r}", named)
            by_token[key] = tenant
        for san in tenant.sans:
            if san in by_san:
                raise TenantsFileError(f"{where}: client_cert_san {san!r} identifies tenant {by_san[san].name!r} already", named)
            by_san[san] = tenant
        tenants.append(tenant)
    return TenantTable(path, tuple(tenants), by_token, by_san)


def _tenant(path: Path, i: int, entry: Any, named: list[Path]) -> tuple[Tenant, Optional[bytes]]:
    """One entry of the list, checked; its token read from its file."""
    where = f"tenants file {path}: entry {i + 1}"
    if not isinstance(entry, dict):
        raise TenantsFileError(f"{where} is not a mapping", named)
    unknown = sorted(str(k) for k in set(entry) - KEYS)
    if unknown:
        raise TenantsFileError(f"{where}: unknown key(s) {unknown}; known: {sorted(KEYS)}", named)
    name = entry.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise TenantsFileError(f"{where}: name must be 1-63 characters of [a-z0-9_-], got {name!r}", named)
    where = f"tenants file {path}: tenant {name!r}"
    prefix = entry.get("job_prefix")
    if not isinstance(prefix, str) or not JOB_ID.fullmatch(prefix):
        raise TenantsFileError(
            f"{where}: job_prefix must start a job id (1-200 characters of [A-Za-z0-9._:@/+=-], "
            f"starting with a letter or digit), got {prefix!r}", named,
        )
    sans = _sans(entry.get("client_cert_san"), where, named)
    token_file, token = None, None
    if entry.get("token_file") is not None:
        if not isinstance(entry["token_file"], str) or not entry["token_file"]:
            raise TenantsFileError(f"{where}: token_file must be a path", named)
        token_file = path.parent / entry["token_file"]  # a relative path is the tenants file's neighbour
        named.append(token_file)
        try:
            token = token_file.read_text().strip().encode()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not text"
            raise TenantsFileError(f"{where}: cannot read token file {token_file}: {reason}", named) from None
        if len(token) < MIN_TOKEN_CHARS:
            raise TenantsFileError(f"{where}: the token in {token_file} must be at least {MIN_TOKEN_CHARS} characters", named)
    if token is None and not sans:
        raise TenantsFileError(f"{where}: give token_file, client_cert_san or both", named)
    return Tenant(name, prefix, token_file, sans), token


def _sans(value: Union[None, str, list[Any]], where: str, named: list[Path]) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else [] if value is None else None
    if values is None or not all(isinstance(v, str) and v and not any(c.isspace() for c in v) for v in values):
        raise TenantsFileError(f"{where}: client_cert_san must be a SAN (URI or DNS name) or a list of them", named)
    return tuple(values)


# Why a caller is UNAUTHENTICATED (``Tenants.identify`` answers a Tenant or one of these).
MISSING = "missing identity: send 'authorization: Bearer <token>' or a client certificate of a tenant"
INVALID_TOKEN = "invalid bearer token"
NO_TENANT_CERT = "no tenant is identified by this client certificate's SANs"
CONFLICT = "the bearer token and the client certificate belong to different tenants"


class Tenants:
    """The tenants file as it is now: re-read when it or a token file changes (looked at most
    every ``recheck_s``, by the calls themselves). A file that fails to load is logged once per
    change and the previous table stays. A token that a reload replaced stays valid for
    ``grace_s`` for the same tenant (running jobs pick up a rotated Secret), unless the tenant is
    gone or the token is now someone else's."""

    def __init__(self, path: Path, recheck_s: float = DEFAULT_RECHECK_S, grace_s: float = DEFAULT_GRACE_S) -> None:
        self._path = path
        self._recheck_s = recheck_s
        self._grace_s = grace_s
        self._lock = threading.Lock()
        self._table = load_tenants(path)  # TenantsFileError at startup: one line, no server
        self._watch = FileWatch(self._table.files, recheck_s)
        self._previous: dict[bytes, tuple[str, float]] = {}  # digest -> (tenant name, valid until)
        self.reloads = 0

    @property
    def path(self) -> Path:
        return self._path

    def table(self) -> TenantTable:
        """The current table, reloaded first when its files changed."""
        with self._lock:  # one caller looks (FileWatch is not thread-safe) and reloads
            if self._watch.changed():
                self._reload()
            return self._table

    def _reload(self) -> None:
        old = self._table
        try:
            new = load_tenants(self._path)
        except TenantsFileError as exc:
            log.error("tenants file %s changed but is unusable, keeping the previous tenants: %s", self._path, exc)
            # watch what the broken version named too: creating a missing token file is a fix
            self._watch = FileWatch(tuple(dict.fromkeys((*old.files, *exc.files))), self._recheck_s)
            return
        now = time.monotonic()
        previous = {d: v for d, v in self._previous.items() if v[1] > now}
        for key, tenant in old.by_token.items():
            if key not in new.by_token and new.named(tenant.name) is not None:
                previous[key] = (tenant.name, now + self._grace_s)
        self._previous = previous
        self._table = new
        self._watch = FileWatch(new.files, self._recheck_s)
        self.reloads += 1
        log.info("tenants reloaded from %s: %s", self._path, ", ".join(t.name for t in new.tenants))

    def identify(self, token: Optional[bytes], sans: Sequence[str]) -> Union[Tenant, str]:
        """The tenant of a caller that sent ``token`` (None: no bearer token) over a connection
        whose verified client certificate has ``sans``, else why it is refused. Both given must
        name the same tenant. (A plain union, not a result object: this runs on every call.)"""
        table = self.table()
        found: Optional[Tenant] = None
        if token is not None:
            key = digest(token)
            found = table.by_token.get(key)
            if found is None:
                found = self._in_grace(table, key)
            if found is None:
                return INVALID_TOKEN
        for san in sans:
            tenant = table.by_san.get(san)
            if tenant is None:
                continue
            if found is not None and tenant is not found:
                return CONFLICT
            found = tenant
        if found is not None:
            return found
        return NO_TENANT_CERT if token is None and sans else MISSING

    def _in_grace(self, table: TenantTable, key: bytes) -> Optional[Tenant]:
        entry = self._previous.get(key)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return table.named(entry[0])
