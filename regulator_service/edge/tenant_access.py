"""Tenant access control on every Regulator RPC (``serve --tenants``), and its metrics.

``TenantInterceptor`` takes the place of the single bearer token: the caller is identified
(``tenants.Tenants.identify``) before its request is parsed, and a request is then held to the
tenant's ``job_prefix`` before any session is looked up, so that a refusal is the same whether
the job exists or not (no existence oracle). ListSessions shows only the tenant's jobs.
A Report stream (``ReportStream``) is identified once, when it opens, and every message of it
is held to the prefix as a unary Report is (the same PERMISSION_DENIED ends the stream); the
tenant metrics count its messages, one per answered or refused Report.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import grpc
from google.protobuf.message import Message
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from inforeg.regulator.v1 import regulator_pb2 as pb

from .interceptors import GO_CODE_NAMES, HandlerCache
from .metrics import PREFIX
from .security import EXEMPT_SERVICES
from .tenants import INVALID_TOKEN, Tenant, Tenants

SERVICE = pb.DESCRIPTOR.services_by_name["Regulator"]
# What each Regulator method addresses. A method missing here is refused to every tenant (fail
# closed): a new RPC must be given its scope (tests/test_tenants.py checks every method has one).
# ReportStream addresses a job with every message (each checked, ``_wrap_stream``).
JOB_ADDRESSED = frozenset({"OpenSession", "Report", "ReportStream", "EndEpoch", "GetSession", "CloseSession"})
STREAMED = frozenset({"ReportStream"})  # request and response streams, held message by message
LISTING = frozenset({"ListSessions"})
# The URI and DNS SANs of a client certificate, as gRPC's auth context names them (an email or
# IP address SAN identifies no tenant).
SAN_PROPERTIES = ("peer_uri", "peer_dns")


def denied_message(tenant: Tenant) -> str:
    """The one PERMISSION_DENIED message of a tenant: it depends on nothing but the tenant."""
    return f"tenant {tenant.name!r} may address only jobs whose job_id starts with {tenant.job_prefix!r}"


def bearer_token(metadata: Optional[Sequence[tuple[str, Any]]]) -> tuple[bool, Optional[bytes]]:
    """(an authorization header was sent, its Bearer token); a header of another scheme is
    (True, None): refused as an invalid token, never ignored."""
    for key, value in metadata or ():
        if key == "authorization":
            scheme, _, token = str(value).partition(" ")
            return True, token.strip().encode() if scheme.lower() == "bearer" else None
    return False, None


def client_sans(context: grpc.ServicerContext) -> tuple[str, ...]:
    """The SANs of the caller's client certificate; gRPC puts them in the auth context only for
    a certificate it verified against --tls-client-ca."""
    auth = context.auth_context()
    return tuple(
        v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for key in SAN_PROPERTIES for v in auth.get(key, ())
    )


def tenants_listing(response: pb.ListSessionsResponse, tenant: Tenant, limit: int) -> pb.ListSessionsResponse:
    """The tenant's sessions of a ListSessions answer; ``limit`` > 0 keeps its newest inactive ones."""
    own = [s for s in response.sessions if tenant.owns(s.job_id)]
    inactive = [s for s in own if s.state not in (pb.SESSION_STATE_OPEN, pb.SESSION_STATE_CORRUPT)]
    if limit > 0 and len(inactive) > limit:
        dropped = {id(s) for s in sorted(inactive, key=lambda s: s.last_active_unix_ms, reverse=True)[limit:]}
        own = [s for s in own if id(s) not in dropped]
    return pb.ListSessionsResponse(sessions=own)


class TenantMetrics:
    """``inforeg_regulator_tenant_rpcs_total{tenant,grpc_method,grpc_code}`` (authenticated
    calls; refused identities are in ``grpc_server_handled_total``) and, read at scrape time,
    ``inforeg_regulator_tenant_sessions_open{tenant}``. Label values come from the tenants file
    and the registered methods only: never a job id."""

    def __init__(self, registry: CollectorRegistry, tenants: Tenants, sessions: Callable[[], Iterable[Any]]) -> None:
        self.rpcs = Counter(
            f"{PREFIX}_tenant_rpcs_total",
            "Regulator RPCs of identified callers, by tenant, method and status code.",
            ["tenant", "grpc_method", "grpc_code"],
            registry=registry,
        )
        for tenant in tenants.table().tenants:
            for method in SERVICE.methods:
                self.rpcs.labels(tenant.name, method.name, "OK")
        registry.register(_SessionsByTenant(tenants, sessions))

    def count(self, tenant: Tenant, method: str, code: Optional[grpc.StatusCode]) -> None:
        """One answered (``code`` None: OK) or failed call of ``tenant``'s."""
        name = "OK" if code is None else GO_CODE_NAMES.get(code, "Unknown")
        self.rpcs.labels(tenant.name, method, name).inc()


class _SessionsByTenant(Collector):
    def __init__(self, tenants: Tenants, sessions: Callable[[], Iterable[Any]]) -> None:
        self._tenants = tenants
        self._sessions = sessions

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(f"{PREFIX}_tenant_sessions_open", "Open sessions by tenant.", labels=["tenant"])
        tenants = self._tenants.table().tenants
        counts = dict.fromkeys((t.name for t in tenants), 0)
        for session in self._sessions():
            owner = next((t for t in tenants if t.owns(session.config.job_id)), None)
            if owner is not None:
                counts[owner.name] += 1
        for name, count in counts.items():
            family.add_metric([name], count)
        yield family


def _refusal(code: grpc.StatusCode, message: str) -> Callable[[Any, grpc.ServicerContext], Any]:
    def abort(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return abort


class TenantInterceptor(grpc.ServerInterceptor):
    """Identifies the caller's tenant and holds every Regulator call to its jobs. Health and
    reflection stay open (probes carry no identity). The wrapped handler receives the request
    as bytes and parses it only once the caller is identified; it is built once per method."""

    def __init__(self, tenants: Tenants, metrics: Optional[TenantMetrics] = None) -> None:
        self._tenants = tenants
        self._metrics = metrics
        self._cache = HandlerCache()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Optional[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        service, _, method = details.method.lstrip("/").rpartition("/")
        handler = continuation(details)
        if service in EXEMPT_SERVICES or handler is None:
            return handler
        scoped = service == SERVICE.full_name and (method in JOB_ADDRESSED or method in LISTING)
        streams = handler.request_streaming or handler.response_streaming
        if scoped and streams and method in STREAMED and handler.request_streaming and handler.response_streaming:
            return self._cache.get(handler, method, lambda: self._wrap_stream(handler, method))
        if not scoped or streams:
            return grpc.unary_unary_rpc_method_handler(
                _refusal(grpc.StatusCode.PERMISSION_DENIED, f"{details.method} is not open to tenants")
            )
        return self._cache.get(handler, method, lambda: self._wrap(handler, method))

    def identify(self, context: grpc.ServicerContext) -> Tenant:
        """The caller's tenant, or the call aborted UNAUTHENTICATED."""
        sent, token = bearer_token(context.invocation_metadata())
        if sent and token is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, INVALID_TOKEN)
        sans = client_sans(context) if self._tenants.table().by_san else ()
        who = self._tenants.identify(token, sans)
        if isinstance(who, str):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, who)
        return who  # type: ignore[return-value]

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserialize = handler.request_deserializer
        behavior = handler.unary_unary
        listing = method in LISTING
        metrics = self._metrics

        def scoped(raw: bytes, context: grpc.ServicerContext) -> Any:
            tenant = self.identify(context)
            request = deserialize(raw) if deserialize is not None else raw
            try:
                response = _call(tenant, request, context)
            except BaseException:
                if metrics is not None:
                    metrics.count(tenant, method, context.code() or grpc.StatusCode.UNKNOWN)
                raise
            if metrics is not None:
                metrics.count(tenant, method, None)
            return response

        def _call(tenant: Tenant, request: Any, context: grpc.ServicerContext) -> Any:
            if not isinstance(request, Message):  # undecodable: the inner handler says so
                return behavior(request, context)
            if listing and request.limit >= 0:  # a negative limit: INVALID_ARGUMENT from the inner handler
                inner = type(request)()
                inner.CopyFrom(request)
                inner.limit = 0  # the server's cap; the tenant's limit is applied to its own
                return tenants_listing(behavior(inner, context), tenant, request.limit)
            if not listing and not tenant.owns(request.job_id):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, denied_message(tenant))
            return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(
            scoped, request_deserializer=None, response_serializer=handler.response_serializer
        )

    def _wrap_stream(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The stream's caller identified at open; each message parsed and held to the tenant's
        prefix before the inner handler sees it (no existence oracle, as for a unary Report)."""
        deserialize = handler.request_deserializer
        behavior = handler.stream_stream
        metrics = self._metrics

        def held(raws: Iterator[bytes], tenant: Tenant, context: grpc.ServicerContext) -> Iterator[Any]:
            for raw in raws:
                request = deserialize(raw) if deserialize is not None else raw
                if isinstance(request, Message) and not tenant.owns(request.job_id):
                    context.abort(grpc.StatusCode.PERMISSION_DENIED, denied_message(tenant))
                yield request

        def scoped(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
            tenant = self.identify(context)
            try:
                for response in behavior(held(raws, tenant, context), context):
                    if metrics is not None:
                        metrics.count(tenant, method, None)
                    yield response
            except GeneratorExit:  # the client left: no message of it was refused
                raise
            except BaseException:
                if metrics is not None:
                    metrics.count(tenant, method, context.code() or grpc.StatusCode.UNKNOWN)
                raise

        return grpc.stream_stream_rpc_method_handler(
            scoped, request_deserializer=None, response_serializer=handler.response_serializer
        )
