"""Routing by job: each job's calls go to one regulator replica, chosen by a hash of its job id.

Every call that names a job carries it in the ``x-inforeg-job`` header (``JOB_HEADER``), so a
proxy (deploy/envoy/envoy.yaml) can hash on it. When the target itself names several replicas
(``ipv4:10.0.0.1:50051,10.0.0.2:50051``, or a DNS name with several records, such as a headless
Service), the channel uses gRPC's own ``ring_hash`` policy on that header (gRFC A76): a job's
calls all land on one replica, and when that replica dies they move to the next one on the ring.

gRPC core only honours the header under ``GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY=true``
(``HASH_KEY_ENV``); it reads the variable when it parses a channel's service config, so setting it
in ``os.environ`` before the channel opens is enough (measured on grpcio 1.85.4). Without it, or on
a grpcio without the feature (1.63.0, the floor, has none), every call would fail (``INTERNAL:
hash attribute not present``, or hang until its deadline under ``wait_for_ready``); there the
channel keeps gRPC's default ``pick_first`` instead, with a warning: every job still talks to one
replica (the first reachable), so no job's calls are spread, but nothing scales out.

``REGULATOR_ROUTING`` (``ROUTING_ENV``): ``auto`` (default: ring hash when the target names
several replicas), ``job`` (ring hash for any target: a DNS name that has one record now and more
later), ``off`` (gRPC's default policy).
"""

from __future__ import annotations

import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, MutableMapping, Optional

import grpc

from .errors import InvalidArgument

log = logging.getLogger(__name__)

JOB_HEADER = "x-inforeg-job"
HASH_KEY_ENV = "GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY"
ROUTING_ENV = "REGULATOR_ROUTING"
MODES = ("auto", "job", "off")
# The oldest grpcio whose ring_hash was measured to route on a request header. The floor (1.63.0)
# cannot; the versions between were checked one by one (docs/deployment.md).
MIN_GRPCIO = (1, 70)
RING_HASH = {"ring_hash_experimental": {"requestHashHeader": JOB_HEADER}}

_SAFE_VALUE = re.compile(r"[\x20-\x7e]{1,200}")
_ADDRESS_LIST = re.compile(r"(ipv4|ipv6):(.*)")
_DNS = re.compile(r"(?:dns:(?:///)?)?(\[[^\]]*\]|[^:\[\]/,]+):(\d+)")
_ADDRESS = re.compile(r"(\[[^\]]*\]|[^:\[\]]*):(\d+)")


def job_metadata(job_id: str) -> tuple[tuple[str, str], ...]:
    """The routing header for a call about ``job_id`` (none for a value gRPC would refuse as a
    header: such a job id is the server's to refuse, with INVALID_ARGUMENT)."""
    return ((JOB_HEADER, job_id),) if _SAFE_VALUE.fullmatch(job_id) else ()


def grpcio_version(version: str = grpc.__version__) -> tuple[int, int]:
    major, minor = (re.findall(r"\d+", version) + ["0", "0"])[:2]
    return int(major), int(minor)


def replicas_named(target: str) -> int:
    """How many replicas ``target`` names: the addresses of an ``ipv4:``/``ipv6:`` list (each
    port checked: ``InvalidArgument``), the distinct records of one family a DNS name resolves to
    now (1 if it does not resolve), 1 for anything else (an IP address, ``unix:``)."""
    m = _ADDRESS_LIST.fullmatch(target)
    if m:
        addresses = [a.strip() for a in m.group(2).split(",") if a.strip()]
        for address in addresses:  # gRPC would take a port above 65535 modulo 65536
            port = _ADDRESS.fullmatch(address)
            if port and int(port.group(2)) > 65535:
                raise InvalidArgument(f"target {target!r}: {port.group(2)} is not a port (0 to 65535)")
        return len(addresses)
    m = _DNS.fullmatch(target)
    if m is None:
        return 1
    host = m.group(1).strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(m.group(2)), type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return 1  # gRPC says what is wrong with the name, on the first call
    per_family: dict[int, set[str]] = {}
    for family, *_, address in infos:
        per_family.setdefault(family, set()).add(str(address[0]))
    return max((len(a) for a in per_family.values()), default=1)


@dataclass(frozen=True)
class Routing:
    """How a channel to ``target`` routes: ``ring_hash`` on the job header or gRPC's default."""

    target: str
    by_job: bool
    reason: str  # why, for the log and the docs' examples

    def service_config(self, base: dict) -> dict:
        """``base`` with the ring-hash policy added when routing by job (a policy already in
        ``base`` wins: the caller chose one)."""
        if not self.by_job or "loadBalancingConfig" in base:
            return base
        return {**base, "loadBalancingConfig": [RING_HASH]}


def plan_routing(
    target: str, env: Optional[Mapping[str, str]] = None, version: str = grpc.__version__
) -> Routing:
    """The routing for a channel to ``target`` under ``env`` (default ``os.environ``) and grpcio
    ``version``; a bad ``REGULATOR_ROUTING`` is a ``ValueError`` naming what it may be."""
    env = os.environ if env is None else env
    mode = env.get(ROUTING_ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ROUTING_ENV}={env[ROUTING_ENV]!r}: expected one of {', '.join(MODES)}")
    if mode == "off" or target.startswith("unix:"):
        return Routing(target, False, f"{ROUTING_ENV}=off" if mode == "off" else "a Unix socket")
    n = replicas_named(target) if mode == "auto" else 0
    if mode == "auto" and n < 2:
        return Routing(target, False, "one replica")
    if grpcio_version(version) < MIN_GRPCIO:
        return Routing(target, False, f"grpcio {version} cannot hash on a request header (needs "
                       f"{MIN_GRPCIO[0]}.{MIN_GRPCIO[1]} or later)")
    if env.get(HASH_KEY_ENV, "true").strip().lower() not in ("true", "yes", "1"):  # gRPC's own reading
        return Routing(target, False, f"{HASH_KEY_ENV}={env[HASH_KEY_ENV]!r}")
    return Routing(target, True, f"{n} replicas" if n else f"{ROUTING_ENV}=job")


def routing_for(target: str, env: Optional[MutableMapping[str, str]] = None) -> Routing:
    """``plan_routing``, with its consequences: routing by job sets ``HASH_KEY_ENV`` in ``env``
    (default ``os.environ``) so that gRPC core honours the header; a target that names several
    replicas but cannot be routed by job logs a warning, once per channel."""
    env = os.environ if env is None else env
    routing = plan_routing(target, env)
    if routing.by_job:
        env.setdefault(HASH_KEY_ENV, "true")
        log.debug("routing each job to one replica of %s (ring_hash on %s; %s)", target, JOB_HEADER, routing.reason)
    elif routing.reason not in ("one replica", "a Unix socket", f"{ROUTING_ENV}=off"):
        log.warning(
            "target %s names several replicas, but %s: every job goes to the first replica that "
            "answers (gRPC's pick_first), none is spread; upgrade grpcio or route with a proxy "
            "(deploy/envoy/envoy.yaml)", target, routing.reason,
        )
    return routing
