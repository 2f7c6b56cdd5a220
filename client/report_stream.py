"""A job's Reports as the messages of one bidirectional ``ReportStream`` per job.

A message of an open stream costs both sides less CPU than a unary call (docs/performance.md),
and the hook reports one step at a time, so ``GrpcTransport.report`` sends each Report on its
job's stream and waits for that message's answer - one message in flight per stream, answered
in order. What this module keeps of unary semantics:

- **Deadlines.** grpcio's response iterator has no timeout, so one watchdog thread per transport
  (``ReportStreams``), woken every ``tick`` (an eighth of the shortest call timeout seen, at most
  a second), cancels a stream whose message is past its deadline: the caller gets
  ``DeadlineExceeded`` about when a unary call would. The message path itself has no thread hop
  of ours (grpcio's own request-consuming thread feeds the stream).
- **Errors.** A message answered with an error ends the stream with that status, mapped exactly
  as a unary call's (``from_rpc_error``); the next Report opens a new stream. A stream that
  breaks (server killed or draining, connection reset) is ``Unavailable`` - transient, so the
  delivery modes and their retries work unchanged; Reports are idempotent per step, so a resent
  step gets its stored answer. A stream that had already answered and breaks is given one fresh
  stream for the message at once (gRPC retries a unary call so too).
- **Older or full servers.** UNIMPLEMENTED on a stream's first message (a server older than the
  RPC) sends every later Report of the transport as a unary call; RESOURCE_EXHAUSTED there
  without a retry-after (the server holds its maximum of streams) sends this job's Reports as
  unary calls for ``RETRY_STREAM_S``. The message that met either is sent as a unary call at
  once (``UseUnary``), never failed.
- **Processes and channels.** Streams belong to the process and channel (stub) they were opened
  on: after a fork the child opens its own; after a channel is replaced (TLS renewal) the old
  stream is half-closed and a new one opened.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable, Optional, Sequence

import grpc

from inforeg.regulator.v1 import regulator_pb2 as pb

from .errors import DeadlineExceeded, Overloaded, RegulatorError, Unavailable, from_rpc_error, retry_after_ms

log = logging.getLogger(__name__)

RETRY_STREAM_S = 60.0  # after the server refused a stream for want of room: unary Reports this long
IDLE_CLOSE_S = 120.0  # a stream unused this long is half-closed (it holds a server worker thread)
TICK_S = (0.02, 1.0)  # the watchdog's shortest and longest sleep
Metadata = Optional[Sequence[tuple[str, str]]]


class UseUnary(Exception):
    """The message must go as a unary Report (no stream for it: an older or full server)."""


class JobStream:
    """One job's open stream on one channel; ``exchange`` sends a message and waits for its answer
    (the caller holds ``lock``)."""

    def __init__(self, stub: object, metadata: Metadata, wait_for_ready: bool) -> None:
        self.stub = stub
        self._outbox: "queue.SimpleQueue[Optional[pb.ReportRequest]]" = queue.SimpleQueue()
        self._call = stub.ReportStream(  # type: ignore[attr-defined]
            iter(self._outbox.get, None), metadata=metadata, wait_for_ready=wait_for_ready
        )
        self.lock = threading.Lock()
        self.deadline: Optional[float] = None  # of the message in flight (monotonic)
        self.sent_deadline = 0.0  # of the last message sent
        self.answered = 0
        self.expired = False  # cancelled by the watchdog: the message's deadline passed
        self.dead = False
        self.last_used = time.monotonic()
        self._closed = False

    def exchange(self, req: pb.ReportRequest, timeout: float) -> pb.ReportResponse:
        self.deadline = self.sent_deadline = time.monotonic() + timeout
        self._outbox.put(req)
        try:
            resp = next(self._call)
        except BaseException:
            self.dead = True
            raise
        finally:
            self.deadline = None
        self.answered += 1
        self.last_used = time.monotonic()
        return resp

    def expire(self, now: float) -> None:
        """Cancels the stream if its message in flight is past its deadline (watchdog thread)."""
        deadline = self.deadline
        if deadline is not None and now >= deadline:
            self.expired = True
            self._call.cancel()

    def half_close(self) -> None:
        """Ends the request side (the server sees the end of the stream); grpcio's thread that
        consumed it exits."""
        if not self._closed:
            self._closed = True
            self._outbox.put(None)

    def on_done(self, fn: Callable[[], None]) -> None:
        """``fn()`` once the call is over (at once if it is)."""
        self._call.add_done_callback(lambda _call: fn())

    def when_done(self) -> threading.Event:
        done = threading.Event()
        self.on_done(done.set)
        return done


def stream_error(stream: JobStream, exc: BaseException, timeout: float) -> RegulatorError:
    """What a failed message raises, as a unary call would (see the module's docstring)."""
    if stream.expired and time.monotonic() >= stream.sent_deadline:
        return DeadlineExceeded(f"no answer to the Report within {timeout:g}s (its stream was cancelled)")
    if stream.expired or not isinstance(exc, grpc.RpcError):
        # StopIteration: the server ended the stream cleanly; expired before this message's own
        # deadline: the watchdog cancelled it as the previous message was answered
        return Unavailable("the regulator ended the Report stream; is it shutting down?")
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    if stream.answered == 0 and (
        code == grpc.StatusCode.UNIMPLEMENTED
        or (code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_ms(exc) is None)
    ):
        raise UseUnary(code.name)
    return from_rpc_error(exc)


class ReportStreams:
    """The open streams of one transport, by job, with their watchdog thread."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.opened = 0  # streams opened (all processes' counts start at their fork)
        self.unimplemented = False  # the server has no ReportStream: unary from now on
        self._unary_until: dict[str, float] = {}
        self._reset(os.getpid())

    def _reset(self, pid: int) -> None:
        # After a fork the parent's streams, locks and watchdog are not this process's. Its
        # streams are kept, never collected here: a collected grpcio call cancels itself, which a
        # child must not do to its parent's calls.
        self._inherited = [*getattr(self, "_inherited", ()), *getattr(self, "_streams", {}).values(),
                           *getattr(self, "_closing", ())]
        self._pid = pid
        self._lock = threading.Lock()
        self._streams: dict[str, JobStream] = {}
        self._closing: set[JobStream] = set()  # half-closed, held until the server ends them
        self._stop: Optional[threading.Event] = None
        self.tick = TICK_S[1]

    def wants_stream(self, job_id: str) -> bool:
        if self.unimplemented:
            return False
        until = self._unary_until.get(job_id)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        self._unary_until.pop(job_id, None)
        return True

    def send(self, stub: object, req: pb.ReportRequest, timeout: float, wait_for_ready: bool,
             metadata: Callable[[], Metadata]) -> pb.ReportResponse:
        """``req``'s answer through its job's stream, within ``timeout`` seconds; ``UseUnary``
        when it must go as a unary call instead."""
        deadline = time.monotonic() + timeout
        if timeout / 8 < self.tick:
            self.tick = max(timeout / 8, TICK_S[0])
        fresh_tries = 1
        while True:
            stream = self._stream(stub, req.job_id, metadata, wait_for_ready)
            with stream.lock:
                if stream.dead:
                    continue  # another thread's message ended it; its replacement is open
                try:
                    return stream.exchange(req, max(deadline - time.monotonic(), 0.001))
                except (grpc.RpcError, StopIteration) as exc:
                    self._drop(req.job_id, stream)
                    try:
                        err = stream_error(stream, exc, timeout)
                    except UseUnary as why:
                        self._use_unary(req.job_id, str(why))
                        raise
            transient = isinstance(err, Unavailable) and not isinstance(err, Overloaded)
            if transient and stream.answered and fresh_tries and time.monotonic() < deadline:
                fresh_tries -= 1  # a stream that worked broke: the message gets one fresh stream
                continue
            raise err

    def _stream(self, stub: object, job_id: str, metadata: Callable[[], Metadata], wait_for_ready: bool) -> JobStream:
        if self._pid != os.getpid():
            self._reset(os.getpid())
        stream = self._streams.get(job_id)
        if stream is not None and stream.stub is stub and not stream.dead:
            return stream
        with self._lock:
            stream = self._streams.get(job_id)
            if stream is not None and stream.stub is stub and not stream.dead:
                return stream
            if stream is not None:  # its channel was replaced (TLS renewal)
                self._retire(stream)
            stream = self._streams[job_id] = JobStream(stub, metadata(), wait_for_ready)
            self.opened += 1
            if self._stop is None:
                self._stop = threading.Event()
                threading.Thread(target=self._watch, args=(self._stop,), name="inforeg-report-streams",
                                 daemon=True).start()
            return stream

    def _drop(self, job_id: str, stream: JobStream) -> None:
        with self._lock:
            if self._streams.get(job_id) is stream:
                del self._streams[job_id]
            self._retire(stream)

    def _retire(self, stream: JobStream) -> None:
        """Half-closes ``stream`` and holds it until it is done (the caller holds ``_lock``):
        grpcio cancels a call whose object is collected, so a stream dropped at once would reach
        the server as cancelled instead of ended."""
        stream.dead = True
        self._closing.add(stream)
        closing = self._closing
        stream.half_close()
        stream.on_done(lambda: closing.discard(stream))

    def _use_unary(self, job_id: str, code: str) -> None:
        if code == grpc.StatusCode.UNIMPLEMENTED.name:
            if not self.unimplemented:
                log.info("the regulator at %s has no ReportStream (an older server): Reports go as unary calls",
                         self.target)
            self.unimplemented = True
        else:
            log.info("the regulator at %s holds its maximum of Report streams: job %s sends unary Reports for "
                     "%gs", self.target, job_id, RETRY_STREAM_S)
            self._unary_until[job_id] = time.monotonic() + RETRY_STREAM_S

    def _watch(self, stop: threading.Event) -> None:
        """Cancels streams past their message's deadline; half-closes idle ones; ends with none."""
        while not stop.wait(self.tick):
            now = time.monotonic()
            with self._lock:
                streams = list(self._streams.items())
            for job_id, stream in streams:
                stream.expire(now)
                if now - stream.last_used > IDLE_CLOSE_S and stream.lock.acquire(blocking=False):
                    try:
                        if stream.deadline is None:
                            self._drop(job_id, stream)
                    finally:
                        stream.lock.release()
            with self._lock:
                if not self._streams and self._stop is stop:
                    self._stop = None
                    return

    def close_job(self, job_id: str, wait_s: float = 1.0) -> None:
        """Half-closes ``job_id``'s stream (its session was closed), as ``close`` does."""
        if self._pid == os.getpid():
            stream = self._streams.get(job_id)
            if stream is not None:
                done = stream.when_done()
                self._drop(job_id, stream)
                done.wait(wait_s)

    def close(self, wait_s: float = 2.0) -> None:
        """Half-closes every stream and waits up to ``wait_s`` for the server to end them (the
        channel closed at once would cancel them before their end reached the server)."""
        if self._pid != os.getpid():
            return
        with self._lock:
            streams, self._streams = list(self._streams.values()), {}
            if self._stop is not None:
                self._stop.set()
                self._stop = None
            done = [stream.when_done() for stream in (*streams, *tuple(self._closing))]
            for stream in streams:
                self._retire(stream)
        end = time.monotonic() + wait_s
        for event in done:
            event.wait(max(end - time.monotonic(), 0))
