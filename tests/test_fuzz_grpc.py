"""Property-based fuzzing over real gRPC: a storm of random and adversarial requests.

Two real servers on loopback get the storm: the in-thread ``RegulatorServer`` over SQLite (the
bulk, >= 10,000 requests) and a ``regulator serve --port 0`` subprocess (a smaller storm, then
SIGTERM). Every answer is checked as it arrives, and at the end:

1. the server never crashed: it still answers health checks and GetSession, the subprocess is
   alive until SIGTERM and then exits 0;
2. only documented status codes come back (OK, INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS,
   FAILED_PRECONDITION, RESOURCE_EXHAUSTED), RESOURCE_EXHAUSTED only for a request over the 1 MiB
   limit or over a documented limit (modalities, open sessions, paged history reads at once), and where the generator knows
   the answer (a poisoned request, an exact replay, a step of a modelled session) the code is one
   that the request's poisons can produce;
3. the sessions created before the storm (official 2-modality, paper 3-modality, none; closed
   epochs, a closed session, a superseded one) are byte-identical afterwards: GetSession with
   steps of every attempt, and ListSessions restricted to their jobs, serialized
   deterministically with nothing cleared (``last_active_unix_ms`` included).

How the requests are made. Hypothesis draws each example's *plan*: which pre-existing session
each attack targets, the attack's kind and its set of poisons, the junk methods, the garbage
kinds, the operations of one modelled scenario. The values inside the requests (floats with
NaN payloads, subnormals and extremes, unicode with control and bidi characters, huge strings,
raw bytes) come from a ``random.Random`` seeded by hypothesis: drawing every value through
hypothesis costs ~40 us per draw, which would blow the time budget. ``derandomize=True`` makes
the whole storm the same on every run.

Why (3) is sound. Requests addressed to the pre-existing jobs are by construction either
refused - each carries at least one poison (stale or unknown attempt, an epoch that is not
open, a step in a gap, a recorded step with other statistics, an unknown / missing / duplicate
modality, a bad number, a bad fallback, a higher attempt with an invalid config or a resume it
cannot do), applied in an order in which no later change can heal an earlier one - or
documented no-ops (an exact replay, EndEpoch of a closed epoch, an identical OpenSession,
closing a closed session). Valid requests only go to other jobs: junk to a small pool of
``fz-*`` ids, and per example one modelled scenario (``sc-*``: open, steps with gaps, replays,
fallback amendments, epochs, attacks, supersede, elastic resume, close) whose answers are
predicted by a model of the session and checked against GetSession at the end.

A fixed corpus of known-nasty requests (``seed_ops``, ``huge_beta_flow``) is sent first, so
that the listed edge cases are hit on every run whatever hypothesis draws.

The storm does not stop at the first problem: every violation is recorded (kind, request,
status, message) and the test fails at the end listing all of them, after printing the request
count and the status-code histogram (``pytest -s`` shows them).
"""

from __future__ import annotations

import math
import random
import re
import string
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import grpc
from google.protobuf import text_format
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inforeg.regulator.v1 import regulator_pb2 as pb
from regulator_service.wire.convert import JOB_ID, MAX_STRENGTH, MODALITY
from regulator_service.capacity.read_pacing import HISTORY_BUSY
from regulator_service.core.manager import Limits
from regulator_service.edge.server import RegulatorServer, ServerConfig
from trainers.serverproc import ServerProcess

from .conftest import roomy_limits

SERVICE = "inforeg.regulator.v1.Regulator"
SC = grpc.StatusCode
OK, INVALID, NOT_FOUND, EXISTS, PRECONDITION, EXHAUSTED = (
    SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.ALREADY_EXISTS, SC.FAILED_PRECONDITION, SC.RESOURCE_EXHAUSTED,
)
DOCUMENTED = frozenset({OK, INVALID, NOT_FOUND, EXISTS, PRECONDITION, EXHAUSTED})
MAX_MESSAGE = 1 << 20  # the server's default grpc.max_receive_message_length
MAX_MODALITIES = Limits().max_modalities
CALL_TIMEOUT = 60.0  # a liveness bound: a call slower than this is a hang (DEADLINE_EXCEEDED is a violation)
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
I32_MIN, I32_MAX = -(2**31), 2**31 - 1
F64_MAX = 1.7976931348623157e308

REQUESTS: dict[str, tuple[Any, Any]] = {
    "OpenSession": (pb.OpenSessionRequest, pb.OpenSessionResponse),
    "Report": (pb.ReportRequest, pb.ReportResponse),
    "EndEpoch": (pb.EndEpochRequest, pb.EndEpochResponse),
    "GetSession": (pb.GetSessionRequest, pb.GetSessionResponse),
    "ListSessions": (pb.ListSessionsRequest, pb.ListSessionsResponse),
    "CloseSession": (pb.CloseSessionRequest, pb.CloseSessionResponse),
}
METHODS = list(REQUESTS)


def _bits(u: int) -> float:
    return struct.unpack("<d", struct.pack("<Q", u))[0]


NON_FINITE = [math.nan, _bits(0x7FF0000000000001), _bits(0xFFF8000000000000), math.inf, -math.inf]  # NaN, signalling, negative
SPECIAL_FLOATS = [
    0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308, 2.225073858507201e-308, 1e-300, 0.5, 1.0, -1.0,
    1e300, F64_MAX, -F64_MAX, *NON_FINITE,
]
NONNEG_SPECIAL = [0.0, -0.0, 5e-324, 2.225073858507201e-308, 1e-300, 1.0, 1e300, F64_MAX]
BAD_SPECIAL = [*NON_FINITE, -5e-324, -2.2250738585072014e-308, -1.0, -F64_MAX]  # refused by every ">= 0, finite"
I64_SPECIAL = [0, 1, -1, 2, 7, 2**31 - 1, 2**31, -(2**31), 2**53 + 1, I64_MAX, I64_MAX - 1, I64_MIN]
I32_SPECIAL = [I32_MIN, I32_MAX, -1, 0, 1, 2, 3, 9]
WEIRD_TEXT = [
    "", " ", "\x00", "\t", "\n", "a\x00b", "\u202e", "\u200f\u200e", "job\u202eboj", "\u00fc", "\u65e5\u672c",
    "\U0001f600", "\ufeff", "a" * 201, "-lead", ".", "a b", "..", "\x7f", "\u0085", "\u2028", "\uff21",
    "\u0661\u0662", "a\u0301", "\U0010ffff", "x" * 65, "sc-\u202e1", "\u2066x\u2069", "\u200b",
]
BIDI = ["\u202e", "\u202d", "\u202a", "\u200f", "\u200e", "\u2066", "\u2067", "\u2069", "\ufeff", "\u200b", "\u061c"]
INVALID_MODALITY = ["", " ", "a b", "-x", ".x", "x" * 65, "\u00fc", "\u202eab", "a\x00", "\u65e5\u672c", "a/b", "a:b", "\n", "a\u200b"]
NEAR_NAMES = ["a", "b", "c", "audio", "visual", "u", "v", "x.1", "y_2", "Z-3", "left", "right", "_", "0", "m" * 64]
FZ_POOL = [f"fz-{i}" for i in range(10)] + ["A", "0", "z" * 200, "x.y:z@w/v+u=t-s", "fz/..", "fz=="]
ALNUM = string.ascii_letters + string.digits
JOB_CHARS = ALNUM + "._:@/+=-"
MODALITY_CHARS = ALNUM + "_.-"


class Gen:
    """Values for one example, from a random.Random seeded by hypothesis."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    # -- plumbing
    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def bool(self) -> bool:
        return self.r.random() < 0.5

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def choice(self, seq: Any) -> Any:
        return seq[self.r.randrange(len(seq))]

    def pick(self, options: list[tuple[float, Any]]) -> Any:
        """A weighted choice; a chosen callable is called."""
        options = [(w, v) for w, v in options if w > 0]
        x = self.r.random() * sum(w for w, _ in options)
        for w, v in options:
            if x < w:
                return v() if callable(v) else v
            x -= w
        v = options[-1][1]
        return v() if callable(v) else v

    def permutation(self, seq: list) -> list:
        out = list(seq)
        self.r.shuffle(out)
        return out

    # -- numbers
    def magnitude(self) -> float:
        return 10.0 ** self.r.uniform(-323.5, 308.0)

    def any_float(self) -> float:
        return self.pick([
            (3, lambda: self.choice(SPECIAL_FLOATS)),
            (3, lambda: _bits(self.r.getrandbits(64))),  # every bit pattern: NaN payloads, subnormals
            (2, lambda: self.choice([-1.0, 1.0]) * self.magnitude()),
            (2, lambda: self.r.uniform(-100.0, 100.0)),
        ])

    def nonneg(self) -> float:
        return self.pick([(3, lambda: self.choice(NONNEG_SPECIAL)), (4, self.magnitude), (3, lambda: self.r.uniform(0.0, 10.0))])

    def finite(self) -> float:
        return self.pick([(1, lambda: self.choice([0.0, -0.0, 5e-324, -5e-324, F64_MAX, -F64_MAX])), (4, lambda: self.choice([-1.0, 1.0]) * self.magnitude())])

    def bad_float(self) -> float:
        return self.pick([(3, lambda: self.choice(BAD_SPECIAL)), (2, lambda: -self.magnitude() or -5e-324)])

    def unit(self) -> float:
        return self.pick([(1, lambda: self.choice([0.0, -0.0, 5e-324, 1.0, 0.5])), (4, self.r.random)])

    def i64(self) -> int:
        return self.pick([(3, lambda: self.int(-2, 8)), (2, lambda: self.choice(I64_SPECIAL)), (3, lambda: self.int(I64_MIN, I64_MAX))])

    def small(self) -> int:
        return self.pick([(6, lambda: self.int(0, 3)), (2, self.i64)])

    def i32(self) -> int:
        return self.pick([(3, lambda: self.int(-2, 8)), (2, lambda: self.choice(I32_SPECIAL)), (2, lambda: self.int(I32_MIN, I32_MAX))])

    # -- strings
    def char(self) -> str:
        k = self.r.random()
        if k < 0.45:
            return chr(self.int(0x20, 0x7E))
        if k < 0.6:
            return chr(self.choice([self.int(0, 0x1F), self.int(0x7F, 0x9F)]))
        if k < 0.8:
            cp = self.int(0xA0, 0xFFFF)
            return chr(cp) if not 0xD800 <= cp <= 0xDFFF else "\ufffd"  # never a lone surrogate
        if k < 0.9:
            return self.choice(BIDI)
        return chr(self.int(0x10000, 0x10FFFF))

    def junk_text(self) -> str:
        if self.chance(0.35):
            return self.choice(WEIRD_TEXT)
        return "".join(self.char() for _ in range(self.int(0, 24)))

    def big_text(self) -> str:
        """17,000 to 200,000 characters (at most ~800 KB of UTF-8), above gRPC's 16 KiB
        metadata limit, below the 1 MiB request limit."""
        unit = self.choice(["x", "\u00e9", "\u202e", "\u65e5", "ab\x00", "\U0001f600"])
        n = self.int(17_000, 200_000)
        return (unit * (n // len(unit) + 1))[:n]

    def valid_job(self) -> str:
        n = self.pick([(7, lambda: self.int(0, 12)), (2, lambda: self.int(13, 80)), (1, lambda: 199)])
        job = self.choice(ALNUM) + "".join(self.r.choices(JOB_CHARS, k=n))
        assert JOB_ID.fullmatch(job)
        return job

    def valid_modality(self) -> str:
        n = self.pick([(8, lambda: self.int(0, 8)), (1, lambda: self.int(9, 62)), (1, lambda: 63)])
        name = self.choice(ALNUM + "_") + "".join(self.r.choices(MODALITY_CHARS, k=n))
        assert MODALITY.fullmatch(name)
        return name

    def modalities(self, n: int) -> list[str]:
        out: list[str] = []
        while len(out) < n:
            m = self.choice(NEAR_NAMES) if self.chance(0.3) else self.valid_modality()
            if m not in out:
                out.append(m)
        return out

    def invalid_modality(self) -> str:
        while True:
            m = self.choice(INVALID_MODALITY) if self.chance(0.5) else self.junk_text()
            if not MODALITY.fullmatch(m):
                return m

    def binary(self, max_size: int) -> bytes:
        return self.r.randbytes(self.int(0, max_size))


# -- the session model ------------------------------------------------------------------------


def clone(msg: Any) -> Any:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


@dataclass
class Step:
    req: pb.ReportRequest  # the accepted report (the amending one after a fallback amendment)
    epoch: int


@dataclass
class Sess:
    """What the test knows about one session (one attempt of one job)."""

    job: str
    attempt: int
    world_size: int
    modalities: list[str]
    open_req: pb.OpenSessionRequest
    frozen: bool  # created before the storm: no request may change it
    state: str = "open"  # open | closed | superseded
    epoch: int = 0
    last_step: int = -1
    steps: dict[int, Step] = field(default_factory=dict)
    gaps: list[tuple[int, int]] = field(default_factory=list)  # ranges of unrecorded steps below last_step

    def record(self, req: pb.ReportRequest) -> None:
        if req.step > self.last_step + 1:
            self.gaps.append((self.last_step + 1, req.step - 1))
        self.steps[req.step] = Step(clone(req), req.epoch)
        self.last_step = req.step


class World:
    def __init__(self) -> None:
        self.sessions: dict[tuple[str, int], Sess] = {}
        self.latest: dict[str, int] = {}
        self.pre_jobs: list[str] = []
        self.scenarios = 0
        self.snapshots: dict[tuple[str, int], bytes] = {}  # GetSession(include_steps) of the frozen sessions

    def add(self, s: Sess) -> None:
        self.sessions[(s.job, s.attempt)] = s
        self.latest[s.job] = max(self.latest.get(s.job, -1), s.attempt)

    def protected(self, job: str) -> bool:
        return job in self.pre_jobs or job.startswith(("sc-", "seed-"))

    def frozen(self) -> list[Sess]:
        return [s for s in self.sessions.values() if s.frozen]

    def of_job(self, job: str) -> list[Sess]:
        return [s for (j, _), s in sorted(self.sessions.items()) if j == job]


# -- sending and checking ---------------------------------------------------------------------


@dataclass
class Op:
    method: str
    request: Any  # a request message, or raw bytes sent as they are
    label: str
    expect: Optional[frozenset] = None  # the codes the generator can justify (None: any documented)
    dup: Optional[bool] = None  # an OK Report / EndEpoch answer must have duplicate == dup
    created: Optional[bool] = None  # an OK OpenSession answer must have created == created
    same_as: Optional[bytes] = None  # an OK answer must serialize to exactly these bytes


_LONG_STRING = re.compile(r'"((?:[^"\\]|\\.){80,})"')


def describe(op: Op, payload: bytes) -> str:
    if isinstance(op.request, bytes):
        return f"{op.method} <{len(payload)} raw bytes: {payload[:64].hex()}{'...' if len(payload) > 64 else ''}>"
    text = text_format.MessageToString(op.request, as_one_line=True)
    text = _LONG_STRING.sub(lambda m: f'"{m.group(1)[:40]}...<{len(m.group(1))} chars escaped>"', text)
    return f"{op.method}({text[:700]}{'...' if len(text) > 700 else ''}) [{len(payload)} bytes]"


@dataclass
class Tally:
    name: str
    sent: int = 0
    codes: Counter = field(default_factory=Counter)
    methods: Counter = field(default_factory=Counter)
    created: int = 0
    violations: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def violate(self, kind: str, text: str) -> None:
        self.violations[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < 2:
            ex.append(text)

    def report(self, seconds: float) -> str:
        lines = [
            f"[fuzz {self.name}] {self.sent} requests in {seconds:.1f}s, {self.created} sessions created",
            f"[fuzz {self.name}] status codes: " + ", ".join(f"{c}={n}" for c, n in self.codes.most_common()),
            f"[fuzz {self.name}] methods: " + ", ".join(f"{m}={n}" for m, n in sorted(self.methods.items())),
        ]
        for kind, n in self.violations.most_common():
            lines.append(f"[fuzz {self.name}] VIOLATION x{n}: {kind}")
            lines += [f"    e.g. {e}" for e in self.examples[kind]]
        return "\n".join(lines)


class Runner:
    """Sends every request as raw bytes through generic unary-unary calls (undecodable payloads
    travel exactly like well-formed ones) and checks every answer."""

    def __init__(self, target: str, tally: Tally) -> None:
        self.channel = grpc.insecure_channel(target)
        self.tally = tally
        self.calls = {
            m: self.channel.unary_unary(f"/{SERVICE}/{m}", request_serializer=None, response_deserializer=None)
            for m in METHODS
        }

    def close(self) -> None:
        self.channel.close()

    def _payload(self, op: Op) -> bytes:
        self.tally.sent += 1
        self.tally.methods[op.method] += 1
        return op.request if isinstance(op.request, bytes) else op.request.SerializeToString()

    def submit(self, op: Op) -> tuple[Op, bytes, Any]:
        """Starts a call (futures: many in flight at once)."""
        payload = self._payload(op)
        return op, payload, self.calls[op.method].future(payload, timeout=CALL_TIMEOUT)

    def finish(self, pending: tuple[Op, bytes, Any]) -> tuple[grpc.StatusCode, Any]:
        op, payload, fut = pending
        return self._check(op, payload, fut.result)

    def call(self, op: Op) -> tuple[grpc.StatusCode, Any]:
        """One blocking call (a lone future costs three times as much as a blocking call)."""
        payload = self._payload(op)
        return self._check(op, payload, lambda: self.calls[op.method](payload, timeout=CALL_TIMEOUT))

    def _check(self, op: Op, payload: bytes, result: Callable[[], bytes]) -> tuple[grpc.StatusCode, Any]:
        details, raw = "", None
        try:
            raw = result()
            code = OK
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        self.tally.codes[code.name] += 1
        response = None
        if code == OK:
            response = REQUESTS[op.method][1].FromString(raw)
            if op.method == "OpenSession" and response.created:
                self.tally.created += 1
        problem = _problem(op, payload, code, details, response)
        if problem:
            self.tally.violate(f"{problem} [{op.label}]", f"{describe(op, payload)} -> {code.name}: {details[:240]!r}")
        return code, response

    def run_batch(self, ops: list[Op]) -> None:
        for pending in [self.submit(op) for op in ops]:
            self.finish(pending)


def _problem(op: Op, payload: bytes, code: grpc.StatusCode, details: str, response: Any) -> Optional[str]:
    if code not in DOCUMENTED:
        return f"undocumented status {code.name}"
    if len(payload) > MAX_MESSAGE:
        return None if code == EXHAUSTED else "request over the 1 MiB limit not RESOURCE_EXHAUSTED"
    if code == EXHAUSTED and _busy_history_read(op, details):
        return None  # every read slot taken by the storm's other reads: refused at once, retryable
    if code == EXHAUSTED and not _legit_exhaustion(op, payload, details):
        return "RESOURCE_EXHAUSTED for a request under every documented limit"
    if _beyond_index(op):  # refused whatever else the request would have met
        return None if code in (INVALID, EXHAUSTED) else f"status {code.name} for a number >= 2^53, expected INVALID_ARGUMENT"
    if code == INVALID and "overflow" in details and "float64" in details and _may_overflow(op):
        return None  # finite values that overflow where they meet the coefficient or the epoch's sums
    if op.expect is not None and code not in op.expect:
        return f"status {code.name}, expected {'/'.join(sorted(c.name for c in op.expect))}"
    if code != OK and not details:
        return "error without a message"
    if code == OK:
        if op.dup is not None and response.duplicate != op.dup:
            return f"duplicate={response.duplicate}, expected {op.dup}"
        if op.created is not None and response.created != op.created:
            return f"created={response.created}, expected {op.created}"
        if op.same_as is not None and response.SerializeToString(deterministic=True) != op.same_as:
            return "answer differs from the pre-storm snapshot"
    return None


# Numbers the server bounds to [0, 2^53) (what JSON readers hold exactly), per request type.
INDEX_FIELDS = {
    "OpenSession": ("attempt", "resume_epoch"),
    "Report": ("attempt", "rank", "epoch", "step", "count"),
    "EndEpoch": ("attempt", "epoch"),
    "CloseSession": ("attempt",),
}


def _beyond_index(op: Op) -> bool:
    fields = INDEX_FIELDS.get(op.method, ())
    return not isinstance(op.request, bytes) and any(getattr(op.request, f) >= 2**53 for f in fields)


def _may_overflow(op: Op) -> bool:
    """A Report the generator cannot tell from one that overflows float64 on the server: fisher
    terms (the coefficient, which can be astronomically large, multiplies them), or values that
    can sum past 1.7e308 over an epoch."""
    if op.method != "Report" or isinstance(op.request, bytes):
        return False
    return any(
        e.WhichOneof("fisher_source") == "fisher_terms" or e.fisher >= 1e300 or e.applied.proximal >= 1e300
        for e in op.request.stats
    )


def _busy_history_read(op: Op, details: str) -> bool:
    """A paged history read beyond ``--max-history-readers`` (read_pacing.py); garbage bytes
    count as one when they decode to a GetSession with steps (the server read them so)."""
    if op.method != "GetSession" or not details.startswith(HISTORY_BUSY):
        return False
    if not isinstance(op.request, bytes):
        return op.request.include_steps
    try:
        return pb.GetSessionRequest.FromString(op.request).include_steps
    except DecodeError:
        return False


def _legit_exhaustion(op: Op, payload: bytes, details: str) -> bool:
    if op.method != "OpenSession":
        return False
    if "sessions are open" in details:  # the documented cap on open sessions
        return True
    try:
        return len(pb.OpenSessionRequest.FromString(payload).modalities) > MAX_MODALITIES
    except Exception:
        return False


# -- valid requests ---------------------------------------------------------------------------


def strength(g: Gen) -> float:
    """A valid paper beta or official gain: finite, >= 0 and at most MAX_STRENGTH."""
    return g.pick([(2, lambda: g.choice([0.0, -0.0, 5e-324, 0.1, 0.9, 0.95, MAX_STRENGTH])), (3, lambda: g.r.uniform(0.0, MAX_STRENGTH))])


def too_strong(g: Gen) -> float:
    """Finite and >= 0 but above MAX_STRENGTH (exp(beta * tanh(gap)) could leave the float range)."""
    return g.choice([math.nextafter(MAX_STRENGTH, math.inf), 1e3, 1e308, F64_MAX])


def valid_open(g: Gen, job: str, attempt: int, kind: Optional[str] = None) -> tuple[pb.OpenSessionRequest, bool]:
    """A valid OpenSession. (The flag is kept for callers; every profile here is valid.)"""
    kind = kind or g.pick([(3, "official"), (3, "paper"), (2, "none"), (2, "ogm_ge"), (1, "unset")])
    n = 2 if kind == "official" else g.pick([(6, 2), (3, 3), (1, lambda: g.int(2, MAX_MODALITIES))])
    mods = g.modalities(n)
    ws = g.pick([(4, 1), (3, lambda: g.int(0, 4)), (1, lambda: g.int(1, I64_MAX))])  # 0 means 1
    req = pb.OpenSessionRequest(job_id=job, attempt=attempt, world_size=ws, modalities=mods)
    risky = False
    if kind == "official":
        q = pb.OfficialProfile(reference_modality=g.choice(["", "", mods[0], mods[1]]))
        if g.bool():
            q.threshold = g.pick([(1, lambda: g.choice([0.0, -0.0, 0.05, math.nextafter(1.0, 0.0)])), (2, lambda: g.r.uniform(0.0, 1.0))])
        if g.bool():
            q.history = g.pick([(3, lambda: g.int(1, 12)), (1, lambda: g.choice([1, 10_000]))])
        for name in ("reference_gain", "other_gain"):
            if g.bool():
                setattr(q, name, strength(g))
        req.profile.official.CopyFrom(q)
    elif kind == "paper":
        q = pb.PaperProfile()
        if g.bool():
            q.beta = strength(g)
        if g.bool():
            q.threshold = g.pick([(2, lambda: g.choice([0.0, -0.0, 0.04, math.nextafter(1.0, 0.0)])), (1, lambda: g.r.uniform(0.0, 1.0))])
        if g.bool():
            q.warmup_epochs = g.pick([(4, lambda: g.int(2, 4)), (1, lambda: 2**53 - 1)])
        req.profile.paper.CopyFrom(q)
    elif kind == "none":
        req.profile.none.SetInParent()
    elif kind == "ogm_ge":
        o = pb.OgmGeProfile()
        if g.bool():
            o.alpha = strength(g)
        if g.bool():
            o.start_epoch = g.int(0, 3)
        if g.bool():
            o.end_epoch = o.start_epoch + g.pick([(3, lambda: g.int(0, 5)), (1, lambda: 2**53 - 1 - o.start_epoch)])
        if g.bool():
            o.noise = g.bool()
        req.profile.ogm_ge.CopyFrom(o)
    return req, risky


def stat(g: Gen, name: str, count: int, fallback: int) -> pb.ModalityStats:
    score = count * (1.0 + 1e-6) if g.chance(0.05) else float(count) * g.unit()  # (the first is the accepted edge)
    e = pb.ModalityStats(modality=name, score_sum=score)
    if g.chance(0.35):
        e.fisher_terms.CopyFrom(pb.FisherTerms(grad_sq=g.nonneg(), grad_delta=g.finite(), delta_sq=g.nonneg()))
    else:
        e.fisher = g.nonneg()
    if fallback == 1 and g.bool():
        e.applied.proximal = g.choice([0.0, -0.0])
    elif fallback == 2:
        e.applied.proximal = g.nonneg()
        if g.chance(0.25):  # the scales and noise a 'last' fallback applied: recorded as sent
            e.applied.grad_scale = g.pick([(2, lambda: g.choice([1.0, 0.0, -0.0])), (3, g.unit), (1, g.nonneg)])
            e.applied.noise_scale = g.pick([(3, lambda: g.choice([0.0, 1.0])), (1, g.nonneg)])
    return e


def valid_step(g: Gen, s: Sess) -> pb.ReportRequest:
    """A valid report of a new step in the session's open epoch."""
    jump = g.pick([(6, 1), (3, lambda: g.int(2, 50)), (1, lambda: g.int(51, 2**40))])
    count = g.pick([(6, lambda: g.int(1, 256)), (1, lambda: g.choice([1, 2**31, 2**53 + 1, I64_MAX]))])
    fallback = g.pick([(6, 0), (1, 1), (1, 2)])
    return pb.ReportRequest(
        job_id=s.job,
        attempt=s.attempt,
        rank=g.int(0, min(s.world_size - 1, 3)) if g.bool() else 0,
        epoch=s.epoch,
        step=min(s.last_step + jump, I64_MAX),
        count=count,
        stats=[stat(g, m, count, fallback) for m in g.permutation(s.modalities)],
        fallback=fallback,
    )


def replay(g: Gen, s: Sess) -> pb.ReportRequest:
    """A recorded step as it was accepted, with its entries in another order, from any rank."""
    req = clone(s.steps[g.choice(sorted(s.steps))].req)
    entries = g.permutation([clone(e) for e in req.stats])
    del req.stats[:]
    req.stats.extend(entries)
    req.rank = g.int(0, min(s.world_size - 1, 7))
    return req


# -- attacks: requests to a modelled session that must be refused or be a documented no-op -----

# Poisons of a Report, applied in this order: structural ones, then at most one of the fallback
# group, then values, then scalars (one value per field), so that no later change heals an
# earlier one. Hypothesis draws the set.
STRUCTURAL = ["missing_modality", "unknown_modality_replace", "unknown_modality_add", "duplicate_modality"]
FALLBACK_POISONS = ["applied_without_fallback", "neutral_nonzero", "last_missing_applied", "bad_applied", "unknown_fallback"]
VALUES = ["bad_score", "bad_fisher", "bad_terms", "no_fisher", "score_over_count"]
SCALARS = ["count", "rank", "epoch", "step", "attempt"]
POISONS = STRUCTURAL + FALLBACK_POISONS + VALUES + SCALARS


def unknown_name(g: Gen, s: Sess) -> str:
    while True:
        m = g.pick([(1, g.big_text), (12, g.valid_modality), (12, g.junk_text), (4, lambda: g.choice(NEAR_NAMES))])
        if m not in s.modalities:
            return m


def poison_report(g: Gen, w: World, s: Sess, req: pb.ReportRequest, poisons: frozenset) -> tuple[pb.ReportRequest, frozenset]:
    """Applies the poisons (at least one) to a report for ``s``; returns it with the codes it can get."""
    poisons = set(poisons) or {g.choice(POISONS)}
    latest = w.latest[s.job]
    codes: set = set()
    entries = [clone(e) for e in req.stats]
    fallback = req.fallback

    def some() -> pb.ModalityStats:
        return entries[g.int(0, len(entries) - 1)]

    for name in [p for p in STRUCTURAL if p in poisons]:
        codes.add(INVALID)
        if name == "missing_modality":
            gone = g.choice(s.modalities)
            entries = [e for e in entries if e.modality != gone]
        elif name == "unknown_modality_replace":
            some().modality = unknown_name(g, s)
        elif name == "duplicate_modality":
            twin = clone(some())
            if g.bool():
                twin.score_sum = 0.0
            entries.insert(g.int(0, len(entries)), twin)
        else:
            entries.insert(g.int(0, len(entries)), stat(g, unknown_name(g, s), max(req.count, 1), fallback))
    fallback_poison = next((p for p in FALLBACK_POISONS if p in poisons), None)
    if fallback_poison is not None:
        codes.add(INVALID)
        if fallback_poison == "applied_without_fallback":
            fallback = 0
            some().applied.proximal = g.nonneg()
        elif fallback_poison == "neutral_nonzero":
            fallback = 1
            some().applied.proximal = g.choice([5e-324, 1.0, F64_MAX, g.magnitude()]) or 1.0
        elif fallback_poison in ("last_missing_applied", "bad_applied"):
            fallback = 2
            for e in entries:
                if not e.HasField("applied"):
                    e.applied.proximal = g.nonneg()
            if fallback_poison == "last_missing_applied":
                some().ClearField("applied")
            else:
                some().applied.proximal = g.bad_float()
        else:
            fallback = g.pick([(2, lambda: g.choice([3, 9, -1, I32_MAX, I32_MIN])), (1, lambda: g.int(3, I32_MAX)), (1, lambda: g.int(I32_MIN, -1))])
    for name in [p for p in VALUES if p in poisons]:
        codes.add(INVALID)
        e = some()
        if name == "bad_score":
            e.score_sum = g.bad_float()
        elif name == "bad_fisher":
            e.fisher = g.bad_float()
        elif name == "bad_terms":
            t = pb.FisherTerms(grad_sq=g.nonneg(), grad_delta=g.finite(), delta_sq=g.nonneg())
            which = g.choice(["grad_sq", "grad_delta", "delta_sq"])
            setattr(t, which, g.choice(NON_FINITE) if which == "grad_delta" else g.bad_float())
            e.fisher_terms.CopyFrom(t)
        elif name == "no_fisher":
            e.ClearField("fisher")
            e.ClearField("fisher_terms")
        else:
            e.score_sum = float(max(req.count, 1)) * 2.0 + 1.0
    out = clone(req)
    del out.stats[:]
    out.stats.extend(entries)
    out.fallback = fallback
    for name in [p for p in SCALARS if p in poisons]:
        if name == "count":
            out.count = g.pick([(2, lambda: g.choice([0, -1, I64_MIN])), (1, lambda: g.int(I64_MIN, 0))])
            codes.add(INVALID)
        elif name == "rank":
            if s.world_size < I64_MAX and g.bool():
                out.rank = g.pick([(2, lambda: s.world_size), (1, lambda: g.int(s.world_size, I64_MAX))])
            else:
                out.rank = g.pick([(2, lambda: -1), (1, lambda: g.int(I64_MIN, -1))])
            codes.add(INVALID)
        elif name == "epoch":
            if g.bool():
                out.epoch = g.pick([(2, lambda: -1), (1, lambda: g.int(I64_MIN, -1))])
                codes.add(INVALID)
            else:  # another epoch: a new step for an epoch that is not open, or a recorded step
                # with other statistics (its epoch is part of what identifies them)
                out.epoch = g.pick([(3, lambda: g.int(0, max(s.epoch + 2, 3))), (1, lambda: g.int(0, I64_MAX))])
                if out.epoch == req.epoch:
                    out.epoch = req.epoch + 1 if req.epoch < I64_MAX else 0
                codes.add(EXISTS if out.step in s.steps else PRECONDITION)
        elif name == "step":
            if s.gaps and g.bool():  # back into a gap: an earlier step that was never recorded
                lo, hi = g.choice(s.gaps)
                out.step = g.int(lo, hi)
                codes.add(PRECONDITION)
            else:
                out.step = g.pick([(2, lambda: -1), (1, lambda: g.int(I64_MIN, -1))])
                codes.add(INVALID)
        else:
            out.attempt, attempt_codes = other_attempt(g, latest)
            codes |= attempt_codes
    if s.attempt < latest or s.state != "open":
        codes.add(PRECONDITION)  # the unpoisoned request is refused as well
    return out, frozenset(codes)


def other_attempt(g: Gen, latest: int) -> tuple[int, frozenset]:
    """An attempt that is stale, never opened, or negative."""
    choice = g.pick([(2 if latest > 0 else 0, "stale"), (2 if latest < I64_MAX else 0, "future"), (1, "negative")])
    if choice == "stale":
        return g.pick([(2, lambda: latest - 1), (1, lambda: g.int(0, latest - 1))]), frozenset({PRECONDITION})
    if choice == "future":
        return g.pick([(2, lambda: latest + 1), (1, lambda: g.int(latest + 1, I64_MAX))]), frozenset({NOT_FOUND})
    return g.pick([(2, lambda: -1), (1, lambda: g.int(I64_MIN, -1))]), frozenset({INVALID})


def codes_label(codes: frozenset) -> str:
    return "/".join(sorted(c.name for c in codes))


ATTACK_METHODS = ["Report"] * 12 + ["EndEpoch"] * 3 + ["OpenSession"] * 3 + ["CloseSession"] * 2 + ["GetSession"] * 2 + ["ListSessions"]


def attack(g: Gen, w: World, s: Sess, method: str, variant: int, poisons: frozenset) -> Op:
    """A request to session ``s`` that must be refused or be a documented no-op."""
    latest = w.latest[s.job]
    stale = s.attempt < latest
    fp = frozenset({PRECONDITION})
    if method == "Report":
        kinds = ["poisoned", "poisoned", "poisoned"]
        if s.steps:
            kinds += ["replay_exact", "replay_changed", "replay_fallback"]
        kind = kinds[variant % len(kinds)]
        if kind == "poisoned":
            base = valid_step(g, s) if s.last_step < I64_MAX else replay(g, s)
            req, codes = poison_report(g, w, s, base, poisons)
            return Op("Report", req, f"attack Report poisoned ({codes_label(codes)})", expect=codes)
        req = replay(g, s)
        if kind == "replay_exact":
            if stale:
                return Op("Report", req, "attack Report replay of a superseded attempt", expect=fp)
            if req.fallback != 0 and g.chance(0.3):  # without its fallback: the stored answer wins
                req.fallback = 0
                for e in req.stats:
                    e.ClearField("applied")
            return Op("Report", req, "attack Report exact replay", expect=frozenset({OK}), dup=True)
        if kind == "replay_changed":
            change = g.choice(["count", "score", "fisher", "representation", "epoch"])
            e = req.stats[g.int(0, len(req.stats) - 1)]
            if change == "count":
                req.count = req.count + 1 if req.count < I64_MAX else req.count - 1
            elif change == "score":
                e.score_sum = math.nextafter(e.score_sum, g.choice([-math.inf, math.inf]))
            elif change == "epoch":
                req.epoch = req.epoch + 1 if g.bool() or req.epoch == 0 else req.epoch - 1
            elif change == "fisher" and e.WhichOneof("fisher_source") == "fisher":
                e.fisher = math.nextafter(e.fisher, math.inf)
            elif e.WhichOneof("fisher_source") == "fisher":  # the same number as fisher_terms
                e.fisher_terms.CopyFrom(pb.FisherTerms(grad_sq=e.fisher))
            else:
                e.fisher = e.fisher_terms.grad_sq
            codes = {EXISTS, INVALID} | ({PRECONDITION} if stale else set())
            return Op("Report", req, "attack Report replay with other statistics", expect=frozenset(codes))
        # same statistics, other applied factors
        step = s.steps[req.step]
        prior = step.req.fallback
        if prior == 0 and step.epoch == s.epoch and s.state == "open" and not stale:
            req.fallback = 1  # this would be a legitimate amendment: poison it
            for e in req.stats:
                e.ClearField("applied")
            req, codes = poison_report(g, w, s, req, poisons)
            return Op("Report", req, f"attack Report poisoned amendment ({codes_label(codes)})", expect=codes)
        new = 2 if prior != 2 else g.choice([1, 2])
        req.fallback = new
        for e in req.stats:
            if new == 1:
                e.ClearField("applied")
            elif not e.HasField("applied"):
                e.applied.proximal = g.nonneg()
        if prior == 2 and new == 2:
            e = req.stats[g.int(0, len(req.stats) - 1)]
            e.applied.proximal = math.nextafter(e.applied.proximal, -math.inf if e.applied.proximal == F64_MAX else math.inf)
        codes = {EXISTS} if prior != 0 else {PRECONDITION}
        if stale or s.state != "open":
            codes.add(PRECONDITION)
        return Op("Report", req, "attack Report conflicting fallback", expect=frozenset(codes))
    if method == "EndEpoch":
        req = pb.EndEpochRequest(job_id=s.job, attempt=s.attempt, rank=g.int(0, 3), epoch=s.epoch)
        kinds = ["future_epoch", "negative_epoch", "attempt"]
        if s.epoch > 0:
            kinds.append("old_epoch")
        if s.state != "open" or stale:
            kinds.append("current_epoch")
        kind = kinds[variant % len(kinds)]
        if kind == "future_epoch":
            req.epoch = g.pick([(2, lambda: s.epoch + 1), (1, lambda: g.int(s.epoch + 1, I64_MAX))])
            return Op("EndEpoch", req, "attack EndEpoch of a future epoch", expect=fp)
        if kind == "negative_epoch":
            req.epoch = g.pick([(2, lambda: -1), (1, lambda: g.int(I64_MIN, -1))])
            return Op("EndEpoch", req, "attack EndEpoch negative epoch", expect=frozenset({INVALID}))
        if kind == "old_epoch":
            req.epoch = g.int(0, s.epoch - 1)
            if stale:
                return Op("EndEpoch", req, "attack EndEpoch closed epoch of a superseded attempt", expect=fp)
            return Op("EndEpoch", req, "attack EndEpoch closed epoch again", expect=frozenset({OK}), dup=True)
        if kind == "current_epoch":
            return Op("EndEpoch", req, "attack EndEpoch of an inactive session", expect=fp)
        req.attempt, codes = other_attempt(g, latest)
        return Op("EndEpoch", req, "attack EndEpoch other attempt", expect=codes)
    if method == "CloseSession":
        req = pb.CloseSessionRequest(job_id=s.job, attempt=s.attempt)
        if s.state != "open" and variant % 2:
            if stale:
                return Op("CloseSession", req, "attack CloseSession superseded attempt", expect=fp)
            return Op("CloseSession", req, "attack CloseSession closed again", expect=frozenset({OK}))
        req.attempt, codes = other_attempt(g, latest)
        return Op("CloseSession", req, "attack CloseSession other attempt", expect=codes)
    if method == "OpenSession":
        kind = ["identical", "lower" if latest > 0 else "same_attempt", "same_attempt", "higher_invalid", "higher_bad_resume"][variant % 5]
        if kind == "identical":
            target = w.sessions[(s.job, latest)]
            req = clone(target.open_req)
            if target.state == "open":
                return Op("OpenSession", req, "attack OpenSession identical", expect=frozenset({OK}), created=False)
            return Op("OpenSession", req, "attack OpenSession identical to a closed session", expect=fp)
        req, _ = valid_open(g, s.job, latest)
        codes = {OK, EXISTS, PRECONDITION, INVALID}
        if g.bool():
            codes |= poison_open(g, req)
        if kind == "lower":
            req.attempt = g.pick([(2, lambda: latest - 1), (1, lambda: g.int(0, latest - 1))])
            return Op("OpenSession", req, "attack OpenSession lower attempt", expect=frozenset(codes - {OK, EXISTS}))
        if kind == "same_attempt" or latest == I64_MAX:  # never creates: an equal config is a no-op
            return Op("OpenSession", req, "attack OpenSession same attempt, any config", expect=frozenset(codes), created=False)
        if kind == "higher_bad_resume":  # valid, but it cannot resume: refused before anything is written
            target = w.sessions[(s.job, latest)]
            req = clone(target.open_req)
            req.attempt = g.pick([(2, lambda: latest + 1), (1, lambda: g.int(latest + 1, I64_MAX))])
            if target.epoch < I64_MAX and g.bool():  # beyond the epochs the latest attempt closed
                req.resume_epoch = g.pick([(2, lambda: target.epoch + 1), (1, lambda: g.int(target.epoch + 1, I64_MAX))])
                label = "beyond its closed epochs"
            else:  # with other modalities (reversed: never equal)
                req.resume_epoch = g.int(1, max(1, target.epoch))
                mods = list(reversed(req.modalities))
                del req.modalities[:]
                req.modalities.extend(mods)
                label = "with other modalities"
            return Op("OpenSession", req, f"attack OpenSession higher attempt resuming {label}", expect=fp)
        req, _ = valid_open(g, s.job, g.pick([(2, lambda: latest + 1), (1, lambda: g.int(latest + 1, I64_MAX))]))
        codes = poison_open(g, req)
        return Op("OpenSession", req, "attack OpenSession higher attempt, invalid config", expect=codes)
    if method == "GetSession":
        req = pb.GetSessionRequest(job_id=s.job, include_steps=g.bool())
        if variant % 2:
            req.attempt = s.attempt
            snap = w.snapshots.get((s.job, s.attempt)) if req.include_steps and s.frozen else None
            return Op("GetSession", req, "attack GetSession", expect=frozenset({OK}), same_as=snap)
        req.attempt = g.pick([(2, lambda: g.int(-1, latest + 1)), (1, g.i64)])
        known = req.attempt in {x.attempt for x in w.of_job(s.job)}
        return Op("GetSession", req, "attack GetSession any attempt", expect=frozenset({OK if known else NOT_FOUND}))
    return list_sessions(g)


def list_sessions(g: Gen) -> Op:
    req = pb.ListSessionsRequest(include_inactive=g.bool(), limit=g.i32())
    if req.include_inactive and req.limit == 0 and g.chance(0.8):
        req.limit = 3  # listing every inactive session reads them all from the store: keep most short
    return Op("ListSessions", req, "ListSessions", expect=frozenset({INVALID if req.limit < 0 else OK}))


OPEN_POISONS = [
    "world_size", "attempt", "resume", "one_modality", "duplicate", "bad_name", "bad_name", "too_many", "thousands",
    "paper_beta", "paper_threshold", "paper_warmup", "paper_one", "official_three", "official_ref",
    "official_ref", "official_history", "official_gain", "official_threshold",
]


def poison_open(g: Gen, req: pb.OpenSessionRequest) -> frozenset:
    """Makes an OpenSession invalid; returns the codes it can get."""
    mods = list(req.modalities)
    kind = g.choice(OPEN_POISONS)
    if kind == "world_size":
        req.world_size = g.pick([(2, lambda: -1), (1, lambda: g.int(I64_MIN, -1))])
    elif kind == "attempt":
        req.attempt = g.pick([(2, lambda: -1), (1, lambda: g.int(I64_MIN, -1))])
    elif kind == "resume":
        req.resume_epoch = g.pick([(2, lambda: -1), (1, lambda: g.int(I64_MIN, -1))])
    elif kind == "one_modality":
        del req.modalities[g.int(0, 1):]
    elif kind == "duplicate":
        req.modalities.insert(g.int(0, len(mods)), g.choice(mods))
    elif kind == "bad_name":
        req.modalities[g.int(0, len(mods) - 1)] = g.invalid_modality() if g.chance(0.9) else "y" * 70_000
    elif kind in ("too_many", "thousands"):
        n = g.int(MAX_MODALITIES + 1, 40) if kind == "too_many" else g.int(1000, 6000)
        req.modalities.extend(f"extra{i}" for i in range(n - len(mods)))
        return frozenset({EXHAUSTED})
    elif kind == "paper_one":
        del req.modalities[1:]
        req.profile.paper.SetInParent()
    elif kind.startswith("paper"):
        q = pb.PaperProfile(beta=0.9)
        if kind == "paper_beta":
            q.beta = g.pick([(3, g.bad_float), (1, lambda: too_strong(g))])
        elif kind == "paper_threshold":
            q.threshold = g.choice([*NON_FINITE, -1.0, -1e-300, 1.0, 1e300])
        else:
            q.warmup_epochs = g.pick([(3, lambda: g.int(-2, 1)), (1, lambda: I64_MIN), (1, lambda: g.int(2**53, I64_MAX))])
        req.profile.paper.CopyFrom(q)
    else:
        if len(mods) != 2:
            mods = mods[:2]
            del req.modalities[2:]
        q = pb.OfficialProfile()
        if kind == "official_three":
            req.modalities.append("third" if "third" not in mods else "fourth")
        elif kind == "official_ref":
            q.reference_modality = g.pick([(1, g.big_text), (6, g.valid_modality), (4, g.junk_text)])
            if q.reference_modality in mods or not q.reference_modality:
                q.reference_modality = "?" + mods[0]  # '?' is in no valid modality name
        elif kind == "official_history":
            q.history = g.pick([(2, lambda: g.choice([0, -1, 10_001])), (1, lambda: g.int(I64_MIN, 0)), (1, lambda: g.int(10_001, I64_MAX))])
        elif kind == "official_gain":
            setattr(q, g.choice(["reference_gain", "other_gain"]), g.pick([(3, g.bad_float), (1, lambda: too_strong(g))]))
        else:
            q.threshold = g.choice([*NON_FINITE, -1.0, -1e-300, 1.0, 1e300])
        req.profile.official.CopyFrom(q)
    return frozenset({INVALID})


# -- junk: anything at all, to jobs nobody checks ----------------------------------------------


def junk_job(g: Gen, w: World) -> str:
    job = g.pick([
        (12, lambda: g.choice(FZ_POOL)),
        (2, g.valid_job),
        (2, g.junk_text),
        (1, lambda: g.choice(w.pre_jobs) + g.choice(["x", " ", "\u202e", "/..", "\x00"])),
        (1, lambda: g.choice(w.pre_jobs).upper()),
        (0.3, g.big_text),
    ])
    return "z" + job if w.protected(job) else job


def junk_name(g: Gen) -> str:
    return g.pick([(4, lambda: g.choice(NEAR_NAMES)), (2, g.valid_modality), (2, g.junk_text), (0.1, g.big_text)])


def junk_stats(g: Gen) -> list[pb.ModalityStats]:
    if g.chance(0.02):  # thousands of entries
        return [pb.ModalityStats(modality=f"m{i}", score_sum=1.0, fisher=1.0) for i in range(g.int(1000, 4000))]
    out = []
    for _ in range(g.int(0, 4)):
        e = pb.ModalityStats(modality=junk_name(g), score_sum=g.any_float())
        source = g.int(0, 2)
        if source == 1:
            e.fisher = g.any_float()
        elif source == 2:
            e.fisher_terms.CopyFrom(pb.FisherTerms(grad_sq=g.any_float(), grad_delta=g.any_float(), delta_sq=g.any_float()))
        if g.chance(0.25):
            e.applied.proximal = g.any_float()
        out.append(e)
    return out


def junk_request(g: Gen, w: World, method: str) -> Any:
    if method == "OpenSession":
        mods = g.pick([
            (6, lambda: [g.choice(NEAR_NAMES) for _ in range(g.int(0, 4))]),
            (2, lambda: [g.valid_modality() for _ in range(g.int(0, 5))]),
            (1, lambda: [junk_name(g) for _ in range(g.int(0, 4))]),
            (0.5, lambda: [f"m{i}" for i in range(g.int(17, 5000))]),
        ])
        req = pb.OpenSessionRequest(job_id=junk_job(g, w), attempt=g.small(), world_size=g.pick([(4, lambda: g.int(0, 3)), (1, g.i64)]), modalities=mods)
        if g.chance(0.2):
            req.resume_epoch = g.small()
        kind = g.int(0, 3)
        if kind == 1:
            q = req.profile.paper
            q.SetInParent()
            if g.bool():
                q.beta = g.any_float()
            if g.bool():
                q.threshold = g.any_float()
            if g.bool():
                q.warmup_epochs = g.i64()
        elif kind == 2:
            q = req.profile.official
            q.reference_modality = g.choice(mods) if mods and g.bool() else junk_name(g)
            for name in ("threshold", "reference_gain", "other_gain"):
                if g.bool():
                    setattr(q, name, g.any_float())
            if g.bool():
                q.history = g.i64()
        elif kind == 3:
            req.profile.none.SetInParent()
        return req
    if method == "Report":
        return pb.ReportRequest(
            job_id=junk_job(g, w), attempt=g.small(), rank=g.small(), epoch=g.small(),
            step=g.pick([(4, lambda: g.int(0, 50)), (1, g.i64)]), count=g.pick([(4, lambda: g.int(1, 64)), (1, g.i64)]),
            stats=junk_stats(g), fallback=g.pick([(6, lambda: g.int(0, 2)), (1, g.i32)]),
        )
    if method == "EndEpoch":
        return pb.EndEpochRequest(job_id=junk_job(g, w), attempt=g.small(), rank=g.small(), epoch=g.small())
    if method == "GetSession":
        req = pb.GetSessionRequest(job_id=junk_job(g, w), include_steps=g.bool())
        if g.bool():
            req.attempt = g.small()
        return req
    if method == "ListSessions":
        return list_sessions(g).request
    return pb.CloseSessionRequest(job_id=junk_job(g, w), attempt=g.small())


JUNK_METHODS = ["OpenSession"] * 3 + ["Report"] * 6 + ["EndEpoch"] * 2 + ["GetSession"] * 2 + ["ListSessions"] + ["CloseSession"] * 2


def junk(g: Gen, w: World, method: str) -> Op:
    req = junk_request(g, w, method)
    expect = frozenset({INVALID if req.limit < 0 else OK}) if method == "ListSessions" else None
    return Op(method, req, f"junk {method}", expect=expect)


# -- garbage: payloads that are not (or barely) protobuf --------------------------------------

CRAFTED = [
    b"", b"\xff", b"\x80", b"\x0a\x02\xff\xfe", b"\x0a\x01\xc0", b"\x0a\x03\xed\xa0\x80",  # bad UTF-8, an encoded surrogate
    b"\x10" + b"\xff" * 10 + b"\x01", b"\x10" + b"\xff" * 9 + b"\x7f", b"\x0a\x7fab", b"\x00\x01", b"\x0b", b"\x0c",
    b"\x0e", b"\x0f", b"\xf8\xff\xff\xff\x0f\x01", b"\x3a\x03\x0a\x01\xff", b"\x3a\x05\x11\x00\x00\x00",
    b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x22\x01\x80", b"\x40\x09", b"\x40\xff\xff\xff\xff\x0f",
    b"\x12\x00", b"\x09" + b"\x00" * 8, b"\x3a\x80\x80\x80\x80\x10", b"\x2a\x04\x0a\x02\x09\x00", b"\x13\x14",
    b"\x0a\x00" * 1000, b"\x3a\x00" * 5000, b"\x18\x80\x80\x80\x80\x80\x80\x80\x80\x80\x01",
]
GARBAGE_KINDS = ["random", "random", "crafted", "mutated", "mutated", "mutated", "cross"]


def garbage(g: Gen, w: World, method: str, kind: str) -> Optional[Op]:
    if kind == "random":
        payload = g.binary(300)
    elif kind == "crafted":
        payload = g.choice(CRAFTED)
    else:  # a junk request's encoding, damaged, or sent to another method
        payload = junk_request(g, w, method if kind == "mutated" else g.choice(METHODS)).SerializeToString()
        if kind == "mutated":
            for _ in range(g.int(1, 3)):
                how, at = g.int(0, 3), g.int(0, len(payload))
                if how == 0:
                    payload = payload[:at]
                elif how == 1 and payload:
                    at = min(at, len(payload) - 1)
                    payload = payload[:at] + bytes([payload[at] ^ (1 << g.int(0, 7))]) + payload[at + 1 :]
                elif how == 2:
                    payload = payload[:at] + g.r.randbytes(g.int(1, 8)) + payload[at:]
                else:
                    payload = payload + g.choice(CRAFTED)
    try:
        decoded = REQUESTS[method][0].FromString(payload)
    except Exception:
        return Op(method, payload, f"garbage {kind}", expect=frozenset({INVALID}))
    if w.protected(getattr(decoded, "job_id", "")):
        return None  # it happens to address a checked session: not sent
    return Op(method, payload, f"garbage {kind} (decodes)")


def oversize(g: Gen) -> Op:
    extra = g.pick([(2, lambda: g.int(1, 16)), (1, lambda: g.int(17, 100_000))])
    kind = g.int(0, 3)
    if kind == 0:
        return Op("Report", pb.ReportRequest(job_id="j" * (MAX_MESSAGE + extra), count=1), "oversize job_id", expect=frozenset({EXHAUSTED}))
    if kind == 1:
        mods = ["m" * 60] * ((MAX_MESSAGE + extra) // 62 + 1)
        return Op("OpenSession", pb.OpenSessionRequest(job_id="fz-0", modalities=mods), "oversize modalities", expect=frozenset({EXHAUSTED}))
    if kind == 2:
        return Op(g.choice(METHODS), b"\x00" * (MAX_MESSAGE + extra), "oversize raw bytes", expect=frozenset({EXHAUSTED}))
    entries = [pb.ModalityStats(modality="audio", score_sum=1.0, fisher=1.0)] * ((MAX_MESSAGE + extra) // 20 + 1)
    return Op("Report", pb.ReportRequest(job_id="fz-1", count=1, stats=entries), "oversize stats", expect=frozenset({EXHAUSTED}))


# -- one modelled scenario per example ---------------------------------------------------------

STATE_CODES = {"open": pb.SESSION_STATE_OPEN, "closed": pb.SESSION_STATE_CLOSED, "superseded": pb.SESSION_STATE_SUPERSEDED}
SCENARIO_OPS = ["step"] * 7 + ["end"] * 3 + ["replay"] * 2 + ["amend", "reopen", "supersede", "resume", "close", "get"] + ["attack"] * 5


def check_model(tally: Tally, s: Sess, resp: pb.GetSessionResponse, where: str) -> None:
    got = resp.session
    want = (STATE_CODES[s.state], s.epoch, s.last_step, len(s.steps), s.attempt)
    have = (got.state, got.epoch, got.last_step, got.steps, got.attempt)
    if want != have:
        tally.violate(f"session differs from the model [{where}]", f"{s.job}#{s.attempt}: (state, epoch, last_step, steps, attempt) = {have}, model {want}")


def scenario(g: Gen, w: World, runner: Runner, profile: str, plan: list[str]) -> None:
    w.scenarios += 1
    job = f"sc-{w.scenarios}"
    attempt = g.pick([(4, 0), (2, lambda: g.int(1, 5)), (1, lambda: g.int(0, I64_MAX))])
    req, risky = valid_open(g, job, attempt, profile)
    code, _ = runner.call(Op("OpenSession", req, "scenario OpenSession", expect=frozenset({OK, INVALID} if risky else {OK}), created=True))
    if code != OK:
        return
    w.add(Sess(job, attempt, req.world_size or 1, list(req.modalities), clone(req), frozen=False))
    for kind in plan:
        s = w.sessions[(job, w.latest[job])]
        is_open = s.state == "open"
        amendable = [n for n, x in s.steps.items() if x.epoch == s.epoch and x.req.fallback == 0]
        if (
            (kind == "step" and not (is_open and s.last_step < I64_MAX))
            or (kind in ("end", "reopen", "close") and not is_open)
            or (kind == "replay" and not s.steps)
            or (kind == "amend" and not (is_open and amendable))
            or (kind in ("supersede", "resume") and w.latest[job] == I64_MAX)
            or (kind == "resume" and s.epoch == 0)
        ):
            kind = "attack"
        if kind == "step":
            req = valid_step(g, s)
            code, _ = runner.call(Op("Report", req, "scenario Report new step", expect=frozenset({OK}), dup=False))
            if code == OK:
                s.record(req)
        elif kind == "end":
            req = pb.EndEpochRequest(job_id=job, attempt=s.attempt, rank=0, epoch=s.epoch)
            code, _ = runner.call(Op("EndEpoch", req, "scenario EndEpoch", expect=frozenset({OK}), dup=False))
            if code == OK:
                s.epoch += 1
        elif kind == "replay":
            runner.call(Op("Report", replay(g, s), "scenario Report replay", expect=frozenset({OK}), dup=True))
        elif kind == "amend":  # the client ran a step without the answer: record what it applied
            step = g.choice(sorted(amendable))
            req = clone(s.steps[step].req)
            req.fallback = g.choice([1, 2])
            for e in req.stats:
                e.ClearField("applied")
                if req.fallback == 2:
                    e.applied.proximal = g.nonneg()
            code, _ = runner.call(Op("Report", req, "scenario Report fallback amendment", expect=frozenset({OK}), dup=False))
            if code == OK:
                s.steps[step].req = req
        elif kind == "attack":
            target = g.choice(w.of_job(job))
            runner.call(attack(g, w, target, g.choice(ATTACK_METHODS), g.int(0, 11), frozenset(g.r.sample(POISONS, g.int(0, 3)))))
        elif kind == "reopen":
            runner.call(Op("OpenSession", clone(s.open_req), "scenario OpenSession again", expect=frozenset({OK}), created=False))
        elif kind == "supersede":
            latest = w.latest[job]
            new_attempt = g.pick([(4, lambda: latest + 1), (1, lambda: g.int(latest + 1, I64_MAX))])
            req, risky = valid_open(g, job, new_attempt)
            code, _ = runner.call(Op("OpenSession", req, "scenario OpenSession higher attempt", expect=frozenset({OK, INVALID} if risky else {OK}), created=True))
            if code == OK:
                if s.state == "open":
                    s.state = "superseded"
                w.add(Sess(job, new_attempt, req.world_size or 1, list(req.modalities), clone(req), frozen=False))
        elif kind == "resume":  # an elastic restart: same modalities and profile, inherits closed epochs
            req = clone(s.open_req)
            req.attempt = g.pick([(4, lambda: w.latest[job] + 1), (1, lambda: g.int(w.latest[job] + 1, I64_MAX))])
            req.world_size = g.int(0, 4)
            req.resume_epoch = g.int(1, s.epoch)
            code, _ = runner.call(Op("OpenSession", req, "scenario OpenSession resume", expect=frozenset({OK}), created=True))
            if code == OK:
                if s.state == "open":
                    s.state = "superseded"
                w.add(Sess(job, req.attempt, req.world_size or 1, list(req.modalities), clone(req), frozen=False, epoch=req.resume_epoch))
        elif kind == "close":
            code, _ = runner.call(Op("CloseSession", pb.CloseSessionRequest(job_id=job, attempt=s.attempt), "scenario CloseSession", expect=frozenset({OK})))
            if code == OK:
                s.state = "closed"
        else:
            target = g.choice(w.of_job(job))
            req = pb.GetSessionRequest(job_id=job, attempt=target.attempt, include_steps=g.bool())
            code, resp = runner.call(Op("GetSession", req, "scenario GetSession", expect=frozenset({OK})))
            if code == OK:
                check_model(runner.tally, target, resp, "scenario GetSession")


# -- a fixed corpus of known-nasty requests, sent once per storm -------------------------------


def seed_ops(w: World) -> list[Op]:
    inv, fp, ok = frozenset({INVALID}), frozenset({PRECONDITION}), frozenset({OK})
    base = clone(w.sessions[("pre-official", 1)].steps[23].req)
    base.step = 24
    audio, visual = (clone(e) for e in sorted(base.stats, key=lambda e: e.modality))

    def rep(stats: Optional[list] = None, **kw: Any) -> pb.ReportRequest:
        r = clone(base)
        for k, v in kw.items():
            setattr(r, k, v)
        if stats is not None:
            del r.stats[:]
            r.stats.extend(stats)
        return r

    def paper(**kw: Any) -> pb.OpenSessionRequest:
        return pb.OpenSessionRequest(job_id="fz-seed", modalities=["a", "b"], profile=pb.Profile(paper=pb.PaperProfile(**kw)))

    def official(mods: tuple = ("a", "b"), **kw: Any) -> pb.OpenSessionRequest:
        return pb.OpenSessionRequest(job_id="fz-seed", modalities=list(mods), profile=pb.Profile(official=pb.OfficialProfile(**kw)))

    def open_(job: str, mods: list[str]) -> pb.OpenSessionRequest:
        return pb.OpenSessionRequest(job_id=job, modalities=mods)

    ops = [
        Op("ListSessions", pb.ListSessionsRequest(limit=-1), "seed ListSessions limit -1", expect=inv),
        Op("ListSessions", pb.ListSessionsRequest(include_inactive=True, limit=I32_MIN), "seed ListSessions limit min", expect=inv),
        Op("ListSessions", pb.ListSessionsRequest(include_inactive=True, limit=I32_MAX), "seed ListSessions limit max", expect=ok),
        Op("Report", rep(fallback=3), "seed unknown fallback 3", expect=inv),
        Op("Report", rep(fallback=-1), "seed unknown fallback -1", expect=inv),
        Op("Report", rep(fallback=I32_MAX), "seed unknown fallback max", expect=inv),
        Op("Report", rep(count=I64_MIN), "seed count min", expect=inv),
        Op("Report", rep([audio, visual, pb.ModalityStats(modality="text", score_sum=1.0, fisher=1.0)]), "seed unknown modality", expect=inv),
        Op("Report", rep([audio, pb.ModalityStats(modality="x" * 20_000, score_sum=1.0, fisher=1.0)]), "seed unknown modality with a 20,000-character name", expect=inv),
        Op("Report", pb.ReportRequest(job_id="fz-nothing", count=1, stats=[pb.ModalityStats(modality="n" * 50_000, score_sum=math.nan, fisher=1.0)]), "seed NaN score of a 50,000-character modality", expect=inv),
        Op("Report", rep([audio, audio, visual]), "seed duplicate modality", expect=inv),
        Op("Report", rep([visual]), "seed missing modality", expect=inv),
        Op("Report", rep(epoch=1), "seed step for a closed epoch", expect=fp),
        Op("Report", rep(step=7), "seed step in a gap", expect=fp),
        Op("Report", rep(attempt=0), "seed stale attempt", expect=fp),
        Op("Report", rep(attempt=I64_MAX), "seed never-opened attempt", expect=frozenset({NOT_FOUND})),
        Op("Report", rep(step=3, epoch=0), "seed recorded step with other statistics", expect=frozenset({EXISTS})),
        Op("EndEpoch", pb.EndEpochRequest(job_id="pre-official", attempt=1, epoch=I64_MAX), "seed EndEpoch epoch max", expect=fp),
        Op("EndEpoch", pb.EndEpochRequest(job_id="pre-official", attempt=1, epoch=0), "seed EndEpoch again", expect=ok, dup=True),
        Op("OpenSession", paper(beta=math.nan), "seed paper beta NaN", expect=inv),
        Op("OpenSession", paper(beta=-1.0), "seed paper beta negative", expect=inv),
        Op("OpenSession", paper(beta=math.inf), "seed paper beta inf", expect=inv),
        Op("OpenSession", paper(threshold=math.nan), "seed paper threshold NaN", expect=inv),
        Op("OpenSession", paper(warmup_epochs=1), "seed paper warmup 1", expect=inv),
        Op("OpenSession", paper(warmup_epochs=I64_MIN), "seed paper warmup min", expect=inv),
        Op("OpenSession", official(history=0), "seed official history 0", expect=inv),
        Op("OpenSession", official(history=10_001), "seed official history 10001", expect=inv),
        Op("OpenSession", official(reference_modality="c"), "seed official unknown reference", expect=inv),
        Op("OpenSession", official(reference_modality="r" * 20_000), "seed official unknown 20,000-character reference", expect=inv),
        Op("OpenSession", official(other_gain=-5e-324), "seed official negative gain", expect=inv),
        Op("OpenSession", official(("a", "b", "c")), "seed official with 3 modalities", expect=inv),
        Op("OpenSession", open_("fz-seed", ["a"]), "seed 1 modality", expect=inv),
        Op("OpenSession", open_("fz-seed", ["a", "a"]), "seed duplicate modalities", expect=inv),
        Op("OpenSession", open_("fz-seed", ["a", "b\u202e"]), "seed RTL mark in a modality", expect=inv),
        Op("OpenSession", open_("fz-seed", [f"m{i}" for i in range(17)]), "seed 17 modalities", expect=frozenset({EXHAUSTED})),
        Op("OpenSession", open_("fz-seed", [f"m{i}" for i in range(5000)]), "seed 5000 modalities", expect=frozenset({EXHAUSTED})),
        Op("OpenSession", open_("", ["a", "b"]), "seed empty job id", expect=inv),
        Op("OpenSession", open_("j\u202eob", ["a", "b"]), "seed RTL mark in a job id", expect=inv),
        Op("OpenSession", open_("j" * 900_000, ["a", "b"]), "seed 900,000-character job id", expect=inv),
        Op("OpenSession", clone(w.sessions[("pre-official", 1)].open_req), "seed identical OpenSession", expect=ok, created=False),
        Op("OpenSession", pb.OpenSessionRequest(job_id="fz-seed-resume", modalities=["a", "b"], resume_epoch=1), "seed resume without a previous attempt", expect=fp),
        Op("OpenSession", pb.OpenSessionRequest(job_id="fz-seed-resume", modalities=["a", "b"], resume_epoch=-1), "seed negative resume_epoch", expect=inv),
        Op("OpenSession", resumed(w, "pre-official", 2, I64_MAX), "seed resume beyond the closed epochs", expect=fp),
        Op("OpenSession", resumed(w, "pre-official", 2, 3), "seed resume one epoch too far", expect=fp),
        Op("OpenSession", resumed(w, "pre-paper", 1, 1, profile=pb.Profile(paper=pb.PaperProfile(beta=0.6, threshold=0.01))), "seed resume with another profile", expect=fp),
        Op("OpenSession", resumed(w, "pre-none", 4, 2), "seed resume a closed job beyond its closed epochs", expect=fp),
        Op("CloseSession", pb.CloseSessionRequest(job_id="pre-none", attempt=3), "seed close a closed session", expect=ok),
        Op("CloseSession", pb.CloseSessionRequest(job_id="pre-super", attempt=0), "seed close a superseded session", expect=fp),
        Op("GetSession", pb.GetSessionRequest(job_id="pre-super", attempt=1), "seed GetSession never-opened attempt", expect=frozenset({NOT_FOUND})),
        Op("GetSession", pb.GetSessionRequest(job_id="pre-super", attempt=-1), "seed GetSession negative attempt", expect=frozenset({NOT_FOUND})),
    ]
    # the 1 MiB boundary: a request of exactly the limit is decoded (and refused for its job id)
    for size, code in ((MAX_MESSAGE, INVALID), (MAX_MESSAGE + 1, EXHAUSTED)):
        req = pb.GetSessionRequest(job_id="g" * (size - 4))
        assert req.ByteSize() == size
        ops.append(Op("GetSession", req, f"seed {size}-byte request", expect=frozenset({code})))
    for method in METHODS:
        for payload in CRAFTED:
            try:
                REQUESTS[method][0].FromString(payload)
                expect = None  # some of these are valid encodings for some of the messages
            except Exception:
                expect = inv
            ops.append(Op(method, payload, "seed crafted bytes", expect=expect))
    return ops


def resumed(w: World, job: str, attempt: int, epoch: int, profile: Optional[pb.Profile] = None) -> pb.OpenSessionRequest:
    req = clone(w.sessions[(job, w.latest[job])].open_req)
    req.attempt, req.resume_epoch = attempt, epoch
    if profile is not None:
        req.profile.CopyFrom(profile)
    return req


def huge_beta_flow(runner: Runner) -> None:
    """A beta that would make exp(beta * tanh(gap)) leave the float range is refused up front; the
    largest accepted beta keeps every coefficient finite once a window opens (never INTERNAL)."""
    too_big = pb.OpenSessionRequest(job_id="seed-paper-huge-beta", modalities=["a", "b"], profile=pb.Profile(paper=pb.PaperProfile(beta=1e308, threshold=0.0)))
    runner.call(Op("OpenSession", too_big, "seed paper beta 1e308", expect=frozenset({INVALID})))
    job = "seed-paper-max-beta"
    req = pb.OpenSessionRequest(job_id=job, modalities=["a", "b"], profile=pb.Profile(paper=pb.PaperProfile(beta=MAX_STRENGTH, threshold=0.0)))
    code, _ = runner.call(Op("OpenSession", req, "seed paper beta at its maximum", expect=frozenset({OK})))
    if code != OK:
        return
    for epoch in range(3):
        for i in range(2):
            # traces that grow from epoch to epoch, so the window of epoch 2 opens (threshold 0)
            stats = [pb.ModalityStats(modality="a", score_sum=3.0, fisher=1.0 + epoch), pb.ModalityStats(modality="b", score_sum=1.0, fisher=2.0 + epoch)]
            r = pb.ReportRequest(job_id=job, epoch=epoch, step=2 * epoch + i, count=4, stats=stats)
            runner.call(Op("Report", r, f"seed paper max beta, report in epoch {epoch}", expect=frozenset({OK}), dup=False))
        runner.call(Op("EndEpoch", pb.EndEpochRequest(job_id=job, epoch=epoch), "seed paper max beta EndEpoch", expect=frozenset({OK})))


# -- the pre-existing sessions -----------------------------------------------------------------


def ms(name: str, score: float, fisher: Optional[float] = None, terms: Optional[tuple] = None, applied: Optional[float] = None) -> pb.ModalityStats:
    e = pb.ModalityStats(modality=name, score_sum=score)
    if terms is not None:
        e.fisher_terms.CopyFrom(pb.FisherTerms(grad_sq=terms[0], grad_delta=terms[1], delta_sq=terms[2]))
    else:
        e.fisher = fisher
    if applied is not None:
        e.applied.proximal = applied
    return e


def create_pre_sessions(runner: Runner, w: World) -> None:
    ok = frozenset({OK})

    def open_(job: str, attempt: int, ws: int, mods: list[str], profile: pb.Profile) -> Sess:
        req = pb.OpenSessionRequest(job_id=job, attempt=attempt, world_size=ws, modalities=mods, profile=profile)
        assert runner.call(Op("OpenSession", req, "setup OpenSession", expect=ok, created=True))[0] == OK
        for old in w.of_job(job):
            if old.state == "open":
                old.state = "superseded"
        s = Sess(job, attempt, ws, mods, req, frozen=True)
        w.add(s)
        if job not in w.pre_jobs:
            w.pre_jobs.append(job)
        return s

    def report(s: Sess, step: int, stats: list[pb.ModalityStats], count: int = 64, fallback: int = 0) -> None:
        req = pb.ReportRequest(job_id=s.job, attempt=s.attempt, epoch=s.epoch, step=step, count=count, stats=stats, fallback=fallback)
        assert runner.call(Op("Report", req, "setup Report", expect=ok, dup=False))[0] == OK
        if step in s.steps:
            s.steps[step].req = req  # a fallback amendment
        else:
            s.record(req)

    def end(s: Sess) -> None:
        req = pb.EndEpochRequest(job_id=s.job, attempt=s.attempt, epoch=s.epoch)
        assert runner.call(Op("EndEpoch", req, "setup EndEpoch", expect=ok, dup=False))[0] == OK
        s.epoch += 1

    # official, 2 modalities, reference 'visual': epochs 0 and 1 closed, 2 open; gaps 6-7 and 14-19;
    # a 'last' fallback, a 'neutral' one, and a step of the open epoch amended by a fallback report
    off = open_("pre-official", 1, 2, ["audio", "visual"], pb.Profile(official=pb.OfficialProfile(reference_modality="visual", history=3)))
    for epoch, steps in enumerate(([0, 1, 2, 3, 4, 5], [8, 9, 10, 11, 12, 13], [20, 21, 22, 23])):
        for i in steps:
            stats = [ms("audio", 20.0 + i, fisher=1e-3 * (i + 1)), ms("visual", 40.0 - i, terms=(2e-3 * (epoch + 1), -1e-4, 1e-5))]
            if i == 10:
                report(off, i, [ms("audio", 30.0, fisher=1e-3, applied=0.5), ms("visual", 31.0, fisher=2e-3, applied=0.0)], fallback=2)
            else:
                report(off, i, stats, fallback=1 if i == 11 else 0)
        if epoch < 2:
            end(off)
    report(off, 21, list(off.steps[21].req.stats), fallback=1)
    # paper, 3 modalities: three closed epochs with growing traces (windows open), epoch 3 open
    pap = open_("pre-paper", 0, 1, ["a", "b", "c"], pb.Profile(paper=pb.PaperProfile(beta=0.5, threshold=0.01)))
    step = 0
    for epoch in range(4):
        for _ in range(3 if epoch < 3 else 2):
            report(pap, step, [ms("a", 900.0, fisher=(epoch + 1) * 1e-2), ms("b", 500.0 + step, terms=((epoch + 1) * 2e-2, 1e-3, 1e-4)), ms("c", 100.0, fisher=(epoch + 1) * 5e-3)], count=1000)
            step += 1
        if epoch < 3:
            end(pap)
    # none, 3 modalities, closed after one closed epoch (subnormal and huge fisher values)
    non = open_("pre-none", 3, 4, ["x.1", "y_2", "Z-3"], pb.Profile(none=pb.NoneProfile()))
    for i in range(3):
        report(non, i, [ms("x.1", 1.0, fisher=5e-324), ms("y_2", 2.0, fisher=0.0), ms("Z-3", 3.0, fisher=1e300)], count=3)
    end(non)
    report(non, 5, [ms("x.1", 0.0, fisher=1.0), ms("y_2", 0.0, fisher=1.0), ms("Z-3", 0.0, fisher=1.0)], count=1)
    report(non, 6, [ms("x.1", 1.0, fisher=1.0, applied=1.0), ms("y_2", 0.5, fisher=1.0, applied=2.0), ms("Z-3", 0.0, fisher=1.0, applied=0.0)], count=1, fallback=2)
    assert runner.call(Op("CloseSession", pb.CloseSessionRequest(job_id="pre-none", attempt=3), "setup CloseSession", expect=ok))[0] == OK
    non.state = "closed"
    # official attempt 0, superseded by a paper attempt 2
    sup = open_("pre-super", 0, 1, ["u", "v"], pb.Profile(official=pb.OfficialProfile()))
    for i in range(5):
        report(sup, i, [ms("u", 1.0 + i, fisher=1e-2), ms("v", 2.0, fisher=2e-2)], count=8)
    sup2 = open_("pre-super", 2, 3, ["u", "v"], pb.Profile(paper=pb.PaperProfile()))
    for i in range(3):
        report(sup2, i, [ms("u", 3.0, fisher=1e-2), ms("v", 1.0, fisher=2e-2)], count=4)
    end(sup2)
    report(sup2, 5, [ms("u", 3.0, fisher=1e-2), ms("v", 1.0, fisher=2e-2)], count=4)
    assert sup.state == "superseded"


def take_snapshot(runner: Runner, w: World) -> dict[str, bytes]:
    """What the pre-existing sessions show, serialized deterministically, nothing cleared."""
    out: dict[str, bytes] = {}
    ok = frozenset({OK})
    for s in w.frozen():
        for include_steps in (True, False):
            req = pb.GetSessionRequest(job_id=s.job, attempt=s.attempt, include_steps=include_steps)
            _, resp = runner.call(Op("GetSession", req, "snapshot GetSession", expect=ok))
            out[f"GetSession({s.job}#{s.attempt}, include_steps={include_steps})"] = resp.SerializeToString(deterministic=True) if resp else b"<failed>"
    for job in w.pre_jobs:
        _, resp = runner.call(Op("GetSession", pb.GetSessionRequest(job_id=job, include_steps=True), "snapshot GetSession latest", expect=ok))
        out[f"GetSession({job})"] = resp.SerializeToString(deterministic=True) if resp else b"<failed>"
    for inactive in (True, False):
        _, resp = runner.call(Op("ListSessions", pb.ListSessionsRequest(include_inactive=inactive), "snapshot ListSessions", expect=ok))
        listed = [x.SerializeToString(deterministic=True) for x in (resp.sessions if resp else []) if x.job_id in w.pre_jobs]
        out[f"ListSessions(include_inactive={inactive}) of the pre-existing jobs ({len(listed)} sessions)"] = b"|".join(listed)
    return out


# -- the storm ---------------------------------------------------------------------------------

# One example's plan, drawn by hypothesis; the values inside the requests come from `seed`.
ATTACK_PLAN = st.tuples(
    st.integers(0, 63),  # which pre-existing session
    st.sampled_from(ATTACK_METHODS),
    st.integers(0, 11),  # which kind of attack for that method
    st.frozensets(st.sampled_from(POISONS), max_size=3),
)
PLAN = st.fixed_dictionaries({
    "seed": st.integers(0, 2**64 - 1),
    "attacks": st.lists(ATTACK_PLAN, min_size=8, max_size=14),
    "junk": st.lists(st.sampled_from(JUNK_METHODS), min_size=6, max_size=10),
    "garbage": st.lists(st.tuples(st.sampled_from(METHODS), st.sampled_from(GARBAGE_KINDS)), min_size=2, max_size=4),
    "oversize": st.integers(0, 29),  # 0: one request over 1 MiB (each costs ~0.3 s on loopback)
    "profile": st.sampled_from(["official", "paper", "none", "unset"]),
    "scenario": st.lists(st.sampled_from(SCENARIO_OPS), min_size=6, max_size=18),
})


def run_storm(runner: Runner, w: World, examples: int) -> None:
    runner.run_batch(seed_ops(w))
    huge_beta_flow(runner)
    frozen = w.frozen()

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
    @given(plan=PLAN)
    def example(plan: dict) -> None:
        g = Gen(plan["seed"])
        batch = [attack(g, w, frozen[i % len(frozen)], method, variant, poisons) for i, method, variant, poisons in plan["attacks"]]
        batch += [junk(g, w, method) for method in plan["junk"]]
        batch += [op for op in (garbage(g, w, method, kind) for method, kind in plan["garbage"]) if op is not None]
        if plan["oversize"] == 0:
            batch.append(oversize(g))
        g.r.shuffle(batch)
        pending = [runner.submit(op) for op in batch]  # all in flight while the scenario runs
        try:
            scenario(g, w, runner, plan["profile"], plan["scenario"])
        finally:
            for p in pending:
                runner.finish(p)

    example()


def storm_and_check(target: str, name: str, examples: int, min_requests: int, log: Optional[Path] = None) -> list[str]:
    """Creates the pre-existing sessions, snapshots them, runs the storm, checks everything;
    returns the problems found."""
    t0 = time.monotonic()
    tally = Tally(name)
    runner = Runner(target, tally)
    w = World()
    problems: list[str] = []
    try:
        create_pre_sessions(runner, w)
        before = take_snapshot(runner, w)
        w.snapshots = {(s.job, s.attempt): before[f"GetSession({s.job}#{s.attempt}, include_steps=True)"] for s in w.frozen()}
        run_storm(runner, w, examples)
        # (1) the server still answers: health, and every modelled session as the model says
        health = health_pb2_grpc.HealthStub(runner.channel)
        for service in ("", SERVICE):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT).status
            if status != health_pb2.HealthCheckResponse.SERVING:
                problems.append(f"health of {service!r} is {health_pb2.HealthCheckResponse.ServingStatus.Name(status)} after the storm")
        for (job, attempt), s in sorted(w.sessions.items()):
            if not s.frozen:
                code, resp = runner.call(Op("GetSession", pb.GetSessionRequest(job_id=job, attempt=attempt), "final GetSession of a scenario session", expect=frozenset({OK})))
                if code == OK:
                    check_model(tally, s, resp, "after the storm")
        # (3) the pre-existing sessions, byte for byte
        after = take_snapshot(runner, w)
        problems += [f"pre-existing state changed: {key}" for key in before if before[key] != after.get(key)]
    finally:
        runner.close()
    print(f"\n{tally.report(time.monotonic() - t0)}")
    if tally.violations and log is not None and log.exists():
        print(f"[fuzz {name}] server log, last lines:\n" + log.read_text(errors="replace")[-2500:])
    problems += [f"{n} x {kind}" for kind, n in tally.violations.most_common()]  # (2) and the per-request checks
    if tally.sent < min_requests:
        problems.append(f"only {tally.sent} requests were sent, expected at least {min_requests}")
    return problems


def test_fuzz_in_thread_server(tmp_path: Path) -> None:
    """The bulk of the storm, against the in-thread server over SQLite. A small inactive-session
    cache makes the closed and superseded sessions drop out of memory and come back from the
    state file during the storm, so the byte-identical check covers that path too. The store
    timeout is a liveness bound (``roomy_limits``): under heavy load a read may take longer than
    the 2 s default, which would be an undocumented UNAVAILABLE here."""
    config = ServerConfig(port=0, state_dir=tmp_path / "state", grace_seconds=1.0, limits=roomy_limits(inactive_cache=8))
    server = RegulatorServer(config).start()
    try:
        problems = storm_and_check(server.target, "in-thread", examples=320, min_requests=10_000)
        with grpc.insecure_channel(server.target) as channel:  # a plain stub call after the storm
            get = channel.unary_unary(f"/{SERVICE}/GetSession", request_serializer=pb.GetSessionRequest.SerializeToString, response_deserializer=pb.GetSessionResponse.FromString)
            assert get(pb.GetSessionRequest(job_id="pre-official"), timeout=CALL_TIMEOUT).session.job_id == "pre-official"
    finally:
        server.stop(grace=0)
    assert not problems, "fuzzing found problems:\n" + "\n".join(problems)


def test_fuzz_server_process(tmp_path: Path) -> None:
    """A smaller storm against ``regulator serve --port 0`` in its own process: it must stay
    alive through it and exit 0 on SIGTERM."""
    log = tmp_path / "server.log"
    with ServerProcess(state_dir=str(tmp_path / "state"), extra_args=["--grace", "2"], log_path=str(log)) as server:
        problems = storm_and_check(server.target, "subprocess", examples=60, min_requests=2_000, log=log)
        assert server.proc is not None and server.proc.poll() is None, f"the server process died with code {server.proc.returncode}"
        code = server.stop()  # SIGTERM
    assert code == 0, f"regulator serve exited {code} on SIGTERM"
    assert not problems, "fuzzing found problems:\n" + "\n".join(problems)


def test_a_busy_refusal_is_accepted_only_for_what_the_server_read_as_a_paged_read() -> None:
    """The storm sends batches concurrently, so any GetSession with steps may find the read
    slots taken - also garbage bytes that decode to one (a false alarm once in 5 local runs)."""
    busy = f"{HISTORY_BUSY}: 2 paged history reads in progress"
    paged = pb.GetSessionRequest(job_id="x", include_steps=True)
    assert _busy_history_read(Op("GetSession", paged, "typed"), busy)
    assert _busy_history_read(Op("GetSession", paged.SerializeToString(), "garbage (decodes)"), busy)
    assert not _busy_history_read(Op("GetSession", pb.GetSessionRequest(job_id="x").SerializeToString(), "header"), busy)
    assert not _busy_history_read(Op("GetSession", b"\xff\xff\xff", "garbage"), busy)
    assert not _busy_history_read(Op("Report", paged.SerializeToString(), "other method"), busy)
    assert not _busy_history_read(Op("GetSession", paged, "typed"), "too many open sessions")
