"""The server's answers equal the in-process transport's answers bit for bit."""

from __future__ import annotations

from regulator_client import RegulatorClient
from regulator_client.trace import TraceEpochEnd, read_trace

from .conftest import data_file


def drive(client: RegulatorClient, trace_name: str, profile: str, job: str) -> list[bytes]:
    """Every answer of a full session, serialized (the two wall-clock fields zeroed)."""
    header, events = read_trace(data_file(trace_name))
    params = {"reference_modality": header.reference_modality} if profile == "official" else {}
    opened = client.open_session(job, header.modalities, profile, **params)
    opened.session.created_unix_ms = opened.session.last_active_unix_ms = 0
    answers = [opened.SerializeToString(deterministic=True)]
    for ev in events:
        if isinstance(ev, TraceEpochEnd):
            resp = client.end_epoch(job, attempt=0, epoch=ev.epoch)
        else:
            resp = client.report(
                job, attempt=0, epoch=ev.epoch, step=ev.step, count=ev.count,
                score_sums=ev.score_sum,
                # exercise both fisher encodings: ready values and the three fused terms
                fisher={m: (v, 1e-3 * v, 2e-3 * v) if ev.step % 2 else v for m, v in ev.fisher.items()},
            )
        answers.append(resp.SerializeToString(deterministic=True))
    detail = client.get_session(job, include_steps=True)
    detail.session.created_unix_ms = detail.session.last_active_unix_ms = 0
    answers.append(detail.SerializeToString(deterministic=True))
    return answers


def test_server_equals_in_process_bit_for_bit(client: RegulatorClient) -> None:
    for trace, profile in [
        ("trace_pix+mor_seed0.jsonl", "official"),
        ("trace_pix+mor_seed0.jsonl", "paper"),
        ("synthetic_3mod_seed11.jsonl", "paper"),
        ("synthetic_3mod_seed11.jsonl", "none"),
    ]:
        remote = drive(client, trace, profile, f"eq-{profile}-{trace[:5]}")
        local = drive(RegulatorClient.in_process(), trace, profile, f"eq-{profile}-{trace[:5]}")
        assert len(remote) == len(local)
        mismatches = [i for i, (a, b) in enumerate(zip(remote, local)) if a != b]
        assert not mismatches, f"{trace}/{profile}: {len(mismatches)} answers differ, first at {mismatches[0]}"
