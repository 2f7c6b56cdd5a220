"""History pages: a session's step records encoded once and served as bytes.

A step record never changes once a later step exists (the newest one may still get its
deferred Fisher values; an amendment bumps the session's history version), so the records are
encoded to protobuf wire bytes once, in blocks of ``BLOCK_STEPS`` step numbers, and kept in an
LRU cache accounted against the memory budget. A page of ``GetSession`` is then a slice of those
bytes: serving it costs the reader a few microseconds of the interpreter, not the encoding of
thousands of messages, so history readers stop competing with Reports for the GIL. Encoding a
block (the first read of it) is bounded by ``max_encoders`` at a time.

The wire format makes this exact: a ``GetSessionResponse`` is the concatenation of its fields,
and repeated ``steps`` (field 3) are just consecutive length-delimited entries.
"""

from __future__ import annotations

import base64
import bisect
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ..errors import InvalidArgument
from .memory_budget import MemoryBudget
from ..model import EpochSummary, SessionKey, StepRecord

BLOCK_STEPS = 1000  # step numbers per cached block
MAX_PAGE_STEPS = 10_000  # server maximum of GetSessionRequest.page_size (0 = this)
MAX_PAGE_BYTES = 2 << 20  # and never more bytes than this, whatever the modality count
BLOCK_OVERHEAD = 256  # bookkeeping per cached block, for the budget
YIELD_EVERY = 32  # records encoded between offers of the GIL to other threads (~0.5 ms)

EPOCH_CHUNK = 256  # spilled closed epochs read from the store at a time
Loader = Callable[[int, int, int], Sequence[StepRecord]]  # (first, last, limit) -> records in order
EpochLoader = Callable[[int, int], Sequence[EpochSummary]]  # (first, last) -> closed epochs in order
Encoder = Callable[[StepRecord], bytes]  # a StepRecord message's serialized bytes


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def varint_field(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


# -- page tokens ------------------------------------------------------------------------------


def make_token(attempt: int, next_step: int) -> str:
    return base64.urlsafe_b64encode(f"p1:{attempt}:{next_step}".encode()).decode().rstrip("=")


def parse_token(token: str) -> tuple[int, int]:
    """(attempt, next step) of a page token; INVALID_ARGUMENT when it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        tag, attempt, step = raw.split(":")
        if tag != "p1" or int(attempt) < 0 or int(step) < 0:
            raise ValueError
        return int(attempt), int(step)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument("page_token is not a token this server issued (pass next_page_token back unchanged)") from None


# -- cached blocks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """Encoded steps of one block's step range, loaded through ``through``."""

    steps: tuple[int, ...]  # step numbers, ascending
    ends: tuple[int, ...]  # byte offset in ``data`` after each step's field
    data: bytes
    through: int  # every recorded step <= this (within the block) is in here

    @property
    def size(self) -> int:
        return len(self.data) + 16 * len(self.steps) + BLOCK_OVERHEAD

    def extended(self, records: Sequence[StepRecord], encode: Encoder, through: int) -> "Block":
        fields = []
        for i, r in enumerate(records):
            fields.append(field_bytes(3, encode(r)))
            if i % YIELD_EVERY == YIELD_EVERY - 1:
                time.sleep(0)  # let a waiting Report have the interpreter: a block is ~1000 messages
        ends = list(self.ends)
        offset = len(self.data)
        for f in fields:
            offset += len(f)
            ends.append(offset)
        return Block(self.steps + tuple(r.step for r in records), tuple(ends), self.data + b"".join(fields), through)


EMPTY = Block((), (), b"", -1)


@dataclass(frozen=True)
class Page:
    data: bytes  # consecutive ``steps`` fields
    count: int
    next_step: Optional[int]  # where the next page starts; None: no more steps (for now)


class HistoryPages:
    def __init__(self, budget: Optional[MemoryBudget] = None, max_encoders: int = 2, block_steps: int = BLOCK_STEPS) -> None:
        self._budget = budget
        self._block_steps = block_steps
        self._lock = threading.Lock()
        self._blocks: OrderedDict[tuple[SessionKey, int, int], Block] = OrderedDict()  # (key, version, index)
        self._of_session: dict[SessionKey, set[tuple[SessionKey, int, int]]] = {}  # for ``forget``
        self._epochs: OrderedDict[tuple[SessionKey, int], tuple[int, bytes]] = OrderedDict()
        self._encoders = threading.BoundedSemaphore(max_encoders)
        if budget is not None:
            budget.add_evictor(self.evict)

    # -- cache --------------------------------------------------------------------------------

    def _charge(self, delta: int) -> None:
        if self._budget is not None:
            self._budget.add("history", delta)

    def _get(self, key: tuple[SessionKey, int, int]) -> Optional[Block]:
        with self._lock:
            block = self._blocks.get(key)
            if block is not None:
                self._blocks.move_to_end(key)
            return block

    def _put(self, key: tuple[SessionKey, int, int], block: Block) -> None:
        with self._lock:
            old = self._blocks.pop(key, None)
            if old is not None and old.through > block.through:
                block = old  # a concurrent reader got further
            self._blocks[key] = block
            self._of_session.setdefault(key[0], set()).add(key)
            delta = block.size - (old.size if old is not None else 0)
        self._charge(delta)
        if self._budget is not None and not self._budget.fits():
            self._budget.make_room()

    def evict(self, wanted: int) -> int:
        """Drops least recently used blocks until ``wanted`` bytes are freed."""
        freed = 0
        with self._lock:
            while freed < wanted and (self._blocks or self._epochs):
                if self._blocks:
                    bk, block = self._blocks.popitem(last=False)
                    self._unindex(bk)
                    freed += block.size
                else:
                    _, (_, data) = self._epochs.popitem(last=False)
                    freed += len(data) + BLOCK_OVERHEAD
        self._charge(-freed)
        return freed

    def forget(self, key: SessionKey) -> None:
        """Drops a session's pages (its records changed - pruned, reloaded - or it left memory)."""
        freed = 0
        with self._lock:
            for k in self._of_session.pop(key, ()):
                freed += self._blocks.pop(k).size
            old = self._epochs.pop((key, 0), None)
            if old is not None:
                freed += len(old[1]) + BLOCK_OVERHEAD
        self._charge(-freed)

    def _unindex(self, bk: tuple[SessionKey, int, int]) -> None:
        keys = self._of_session.get(bk[0])
        if keys is not None:
            keys.discard(bk)
            if not keys:
                del self._of_session[bk[0]]

    # -- pages --------------------------------------------------------------------------------

    def _block(self, key: SessionKey, version: int, index: int, through: int, load: Loader, encode: Encoder) -> Block:
        """Block ``index`` of the session, covering recorded steps up to ``through``."""
        ck = (key, version, index)
        block = self._get(ck) or EMPTY
        if block.through >= through:
            return block
        first = max(block.through + 1, index * self._block_steps)
        with self._encoders:
            block = self._get(ck) or block  # another reader may have done it meanwhile
            if block.through >= through:
                return block
            records = load(first, through, self._block_steps)
            block = block.extended(records, encode, through)
        self._put(ck, block)
        return block

    def page(
        self,
        key: SessionKey,
        version: int,
        last_step: int,
        start: int,
        max_steps: int,
        load: Loader,
        encode: Encoder,
        max_bytes: int = MAX_PAGE_BYTES,
    ) -> Page:
        """Up to ``max_steps`` recorded steps from ``start``, and no more than ``max_bytes``
        (but at least one step). Steps below ``last_step`` come from cached blocks; the newest one
        (its deferred Fisher values may still arrive) is encoded afresh."""
        parts: list[bytes] = []
        count = size = 0
        step = start
        stable = last_step - 1
        b = self._block_steps
        full = False
        while step <= stable:
            index = step // b
            end = (index + 1) * b - 1
            block = self._block(key, version, index, min(stable, end), load, encode)
            i = bisect.bisect_left(block.steps, step)
            j = min(len(block.steps), i + max_steps - count)
            lo = block.ends[i - 1] if i else 0
            fits = bisect.bisect_right(block.ends, lo + max_bytes - size, i, j)
            j = fits if fits > i or count else min(j, i + 1)  # never past max_bytes, but at least one step
            if j > i:
                parts.append(block.data[lo : block.ends[j - 1]])
                size += block.ends[j - 1] - lo
                count += j - i
                step = block.steps[j - 1] + 1
            if j < len(block.steps) or count >= max_steps:
                full = True
                break
            if end >= stable:
                step = stable + 1
            elif block.steps:
                step = end + 1
            else:  # an empty block: jump over the gap to the next recorded step
                nxt = load(end + 1, stable, 1)
                step = nxt[0].step if nxt else stable + 1
        if not full and step <= last_step and (size < max_bytes or not count):  # the newest step: its record may still change
            newest = load(last_step, last_step, 1)
            if newest:
                parts.append(field_bytes(3, encode(newest[0])))
                count += 1
            step = last_step + 1
        return Page(b"".join(parts), count, step if step <= last_step else None)

    def closed_epochs(
        self, key: SessionKey, closed: Sequence[EpochSummary], encode: Callable[[EpochSummary], bytes],
        spilled: int = 0, read: Optional[EpochLoader] = None,
    ) -> bytes:
        """The ``epochs`` fields of the closed epochs (they never change), extended as more close:
        ``spilled`` epochs come from ``read`` (the store, ``EPOCH_CHUNK`` at a time), then ``closed``."""
        ck = (key, 0)
        total = spilled + len(closed)
        with self._lock:
            cached = self._epochs.get(ck)
            if cached is not None:
                self._epochs.move_to_end(ck)
        n, data = cached if cached is not None else (0, b"")
        if n > total:  # an older snapshot than the cache: encode what it has
            return _encoded_epochs(0, spilled, closed, encode, read)
        if n < total:
            more = _encoded_epochs(n, spilled, closed, encode, read)
            with self._lock:
                old = self._epochs.pop(ck, None)
                if old is not None and old[0] > total:  # a newer snapshot got further meanwhile
                    self._epochs[ck] = old
                    return data + more
                self._epochs[ck] = (total, data + more)
            self._charge(len(data) + len(more) - (len(old[1]) if old is not None else -BLOCK_OVERHEAD))
            data += more
        return data


def _encoded_epochs(
    first: int, spilled: int, closed: Sequence[EpochSummary], encode: Callable[[EpochSummary], bytes],
    read: Optional[EpochLoader],
) -> bytes:
    """Epochs ``first``.. of a session as ``epochs`` fields: those below ``spilled`` from
    ``read``, in chunks, the rest from ``closed``."""
    parts: list[bytes] = []
    for start in range(first, spilled, EPOCH_CHUNK):
        if read is None:
            raise ValueError("spilled epochs need a reader")
        for e in read(start, min(spilled, start + EPOCH_CHUNK) - 1):
            parts.append(field_bytes(2, encode(e)))
        time.sleep(0)  # thousands of epochs: let Reports in between
    parts.extend(field_bytes(2, encode(e)) for e in closed[max(first - spilled, 0) :])
    return b"".join(parts)
