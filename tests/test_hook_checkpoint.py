"""``InfoRegHook.state_dict``/``load_state_dict``: a plain loop checkpoints the hook with its model
and optimizer, crashes, and resumes as the job's next attempt with the coefficients of an
uninterrupted run (real regulator on loopback)."""

from __future__ import annotations

import io
from typing import Any, Optional

import pytest
import torch

from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook

from .test_frameworks import BATCH, N, Views, batches, model_and_optimizer, steps_of

EPOCHS = 4
STEPS_PER_EPOCH = N // BATCH




def run(client: RegulatorClient, job: str, epochs: range, attempt: Any = None, resume: Optional[dict] = None,
        crash_after: Optional[int] = None) -> dict[str, Any]:
    """Trains ``epochs``; returns the checkpoint taken after the last completed epoch."""
    model, opt = model_and_optimizer()
    kw = {} if attempt is None else {"attempt": attempt}
    hook = InfoRegHook(client, dict(model.encoders), job_id=job, profile="official", rank=0, world_size=1, **kw)
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        hook.load_state_dict(resume["hook"])
    data = batches(Views())
    ckpt: dict[str, Any] = {}
    hook.open()
    for epoch in epochs:
        hook.on_epoch_start(epoch)
        for i, batch in enumerate(data):
            if crash_after is not None and epoch == epochs[-1] and i == crash_after:
                return ckpt  # the process dies: no epoch end, no CloseSession
            opt.zero_grad(set_to_none=True)
            out = model(**batch)
            out["loss"].backward()
            hook.after_backward(logits=out["unimodal_logits"], labels=batch["labels"])
            opt.step()
        hook.on_epoch_end()
        buf = io.BytesIO()  # what a checkpoint file would hold, through torch.save/load
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "hook": hook.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
    hook.close()
    return ckpt


def epochs_of(client: RegulatorClient, job: str) -> list[tuple]:
    return [
        (e.epoch, e.closed, e.steps, tuple((m.modality, m.fisher_trace, m.window.open, m.mean_proximal) for m in e.modalities))
        for e in client.get_session(job).epochs
    ]


@pytest.mark.parametrize("attempt", [None, 0], ids=["regulator-assigned", "numbered-by-hand"])
def test_resumed_loop_continues_like_an_uninterrupted_one(server, attempt: Any) -> None:
    with RegulatorClient.connect(server.target, timeout=10.0) as client:
        run(client, "full", range(EPOCHS), attempt)
        ckpt = run(client, "job", range(3), attempt, crash_after=2)  # epochs 0-1 done, crash in epoch 2
        snapshot = ckpt["hook"].pop("snapshot")  # the closed epochs (tests/test_snapshot_restore.py)
        assert isinstance(snapshot, str)
        assert ckpt["hook"] == {"format": 1, "job_id": "job", "attempt": 0, "modalities": ["a", "b"],
                                "epoch": 2, "step": 2 * STEPS_PER_EPOCH, "in_epoch": False}
        ckpt["hook"]["snapshot"] = snapshot
        crashed = steps_of(client, "job")
        run(client, "job", range(2, EPOCHS), attempt, resume=ckpt)
        info = client.get_session("job").session
        assert info.attempt == 1
        full, resumed = steps_of(client, "full"), steps_of(client, "job")
        assert crashed[: 2 * STEPS_PER_EPOCH] == full[: 2 * STEPS_PER_EPOCH]
        assert [s[1] for s in resumed] == list(range(2 * STEPS_PER_EPOCH, EPOCHS * STEPS_PER_EPOCH))
        assert resumed == full[2 * STEPS_PER_EPOCH :]
        assert epochs_of(client, "job") == epochs_of(client, "full")


def test_load_state_dict_checks_what_it_resumes() -> None:
    client = RegulatorClient.in_process()
    model, _ = model_and_optimizer()
    hook = InfoRegHook(client, dict(model.encoders), job_id="j", profile="official", rank=0, world_size=1, attempt=0)
    state = hook.state_dict()
    assert state["epoch"] == 0 and state["step"] == 0 and not state["in_epoch"]
    with pytest.raises(ValueError, match="belongs to job 'other'"):
        hook.load_state_dict({**state, "job_id": "other"})
    with pytest.raises(ValueError, match="modalities"):
        hook.load_state_dict({**state, "modalities": ["b", "a"]})
    with pytest.raises(ValueError, match="not an InfoRegHook state"):
        hook.load_state_dict({})
    hook.load_state_dict({**state, "epoch": 3, "step": 40, "attempt": 2})
    assert (hook.epoch, hook.step, hook.identity.attempt) == (3, 40, 3)
    opened = InfoRegHook(client, dict(model.encoders), job_id="k", profile="official", rank=0, world_size=1)
    with opened, pytest.raises(RuntimeError, match="before open"):
        opened.load_state_dict(opened.state_dict())
