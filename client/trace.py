"""Statistics traces (docs/trace-format.md): read, write, and replay them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Optional, Sequence, Union


class TraceError(ValueError):
    """A malformed trace, with the line it was found on."""


@dataclass(frozen=True)
class TraceHeader:
    modalities: tuple[str, ...]
    reference_modality: Optional[str]


@dataclass(frozen=True)
class TraceStep:
    epoch: int
    step: int
    count: int
    score_sum: dict[str, float]
    fisher: dict[str, float]


@dataclass(frozen=True)
class TraceEpochEnd:
    epoch: int


TraceEvent = Union[TraceStep, TraceEpochEnd]


def _field(obj: Mapping[str, Any], key: str, kind: type, lineno: int) -> Any:
    if key not in obj:
        raise TraceError(f"line {lineno}: missing {key!r}")
    value = obj[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise TraceError(f"line {lineno}: {key!r} must be {kind.__name__}, got {value!r}")
    return value


def _floats(obj: Mapping[str, Any], key: str, modalities: Sequence[str], lineno: int) -> dict[str, float]:
    d = _field(obj, key, dict, lineno)
    if set(d) != set(modalities):
        raise TraceError(f"line {lineno}: {key!r} has modalities {sorted(d)}, expected {sorted(modalities)}")
    return {m: _field(d, m, float, lineno) for m in modalities}


def read_trace(path: Union[str, os.PathLike[str]]) -> tuple[TraceHeader, list[TraceEvent]]:
    """Parses a whole trace, failing with the line number of the first problem."""
    header: Optional[TraceHeader] = None
    events: list[TraceEvent] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"line {lineno}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise TraceError(f"line {lineno}: expected a JSON object")
            kind = obj.get("type")
            if kind == "session":
                if header is not None:
                    raise TraceError(f"line {lineno}: a second 'session' line")
                mods = _field(obj, "modalities", list, lineno)
                if not all(isinstance(m, str) for m in mods):
                    raise TraceError(f"line {lineno}: modalities must be strings")
                ref = obj.get("reference_modality")
                if ref is not None and ref not in mods:
                    raise TraceError(f"line {lineno}: reference_modality {ref!r} is not a modality")
                header = TraceHeader(tuple(mods), ref)
            elif header is None:
                raise TraceError(f"line {lineno}: the first line must be of type 'session'")
            elif kind == "step":
                events.append(
                    TraceStep(
                        epoch=_field(obj, "epoch", int, lineno),
                        step=_field(obj, "step", int, lineno),
                        count=_field(obj, "count", int, lineno),
                        score_sum=_floats(obj, "score_sum", header.modalities, lineno),
                        fisher=_floats(obj, "fisher", header.modalities, lineno),
                    )
                )
            elif kind == "epoch_end":
                events.append(TraceEpochEnd(_field(obj, "epoch", int, lineno)))
            else:
                raise TraceError(f"line {lineno}: unknown line type {kind!r}")
    if header is None:
        raise TraceError("empty trace: no 'session' line")
    return header, events


class TraceWriter:
    """Appends a live job's statistics in the trace format (the hook's ``record=`` option)."""

    def __init__(self, path: Union[str, os.PathLike[str]], modalities: Sequence[str], reference_modality: Optional[str] = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh: Optional[IO[str]] = open(self.path, "w", encoding="utf-8")
        head: dict[str, Any] = {"type": "session", "modalities": list(modalities)}
        if reference_modality is not None:
            head["reference_modality"] = reference_modality
        self._write(head)

    def _write(self, obj: Mapping[str, Any]) -> None:
        if self._fh is None:
            raise ValueError(f"trace {self.path} is closed")
        self._fh.write(json.dumps(obj) + "\n")

    def step(self, epoch: int, step: int, count: int, score_sum: Mapping[str, float], fisher: Mapping[str, float]) -> None:
        self._write(
            {"type": "step", "epoch": epoch, "step": step, "count": count, "score_sum": dict(score_sum), "fisher": dict(fisher)}
        )

    def epoch_end(self, epoch: int) -> None:
        self._write({"type": "epoch_end", "epoch": epoch})
        assert self._fh is not None
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def replay_events(
    client: Any,
    job_id: str,
    header: TraceHeader,
    events: Sequence[TraceEvent],
    attempt: int = 0,
) -> Iterator[dict[str, Any]]:
    """Feeds a trace's events to an open session and yields the replay output lines."""
    for ev in events:
        if isinstance(ev, TraceEpochEnd):
            client.end_epoch(job_id, attempt=attempt, epoch=ev.epoch)
            continue
        resp = client.report(
            job_id,
            attempt=attempt,
            epoch=ev.epoch,
            step=ev.step,
            count=ev.count,
            score_sums={m: ev.score_sum[m] for m in header.modalities},
            fisher={m: ev.fisher[m] for m in header.modalities},
        )
        line: dict[str, Any] = {
            "epoch": ev.epoch,
            "step": ev.step,
            "factors": {s.modality: s.factors.proximal for s in resp.step.modalities},
        }
        if any(s.factors.HasField("grad_scale") for s in resp.step.modalities):
            # a profile that scales gradients (ogm-ge): absent means 1 (trace-format.md)
            line["grad_scale"] = {
                s.modality: s.factors.grad_scale if s.factors.HasField("grad_scale") else 1.0
                for s in resp.step.modalities
            }
        yield line
