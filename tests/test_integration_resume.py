"""Resume in the Hugging Face and Accelerate integrations: a run crashes in epoch 3, resumes
from the checkpoint of the end of epoch 2 through the framework's own mechanism
(``trainer.train(resume_from_checkpoint=...)``; ``accelerator.load_state``), and its applied
coefficients, the regulator's records and the final weights equal an uninterrupted run's (real
regulator on loopback).

The official profile with ``history=2`` opens the windows for epochs 0-2 and closes them from
epoch 3 on (asserted): a resumed run that restarted the regulator's history at epoch 0 would
reopen them and regulate epochs 3-4, so these tests fail unless the history continues."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from regulator_client import RegulatorClient
from regulator_client.hook import InfoRegHook

from .test_frameworks import BATCH, N, Views, in_order_trainer, model_and_optimizer, steps_of
from .test_hook_checkpoint import epochs_of

EPOCHS = 5
STEPS = N // BATCH  # per epoch
RESUME_STEP = 3 * STEPS  # the checkpoint of the end of epoch 2
CRASH_STEP = RESUME_STEP + 2  # two steps into epoch 3
PROFILE = dict(profile="official", profile_params={"history": 2})


def assert_windows_close_before_the_resume(client: RegulatorClient, job: str) -> None:
    opened = [[m.window.open for m in e.modalities] for e in client.get_session(job).epochs if e.closed]
    assert opened == [[True, True]] * 3 + [[False, False]] * 2


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "the resumed run's weights differ"


def assert_resumed_like_uninterrupted(client: RegulatorClient, full: InfoRegHook, resumed: InfoRegHook) -> None:
    assert_windows_close_before_the_resume(client, "full")
    info = client.get_session("job").session
    assert info.attempt == 1  # the job's next attempt
    uninterrupted, continued = steps_of(client, "full"), steps_of(client, "job")
    assert [s[1] for s in continued] == list(range(RESUME_STEP, EPOCHS * STEPS))
    assert continued == uninterrupted[RESUME_STEP:]  # scores, Fisher values and coefficients, bit for bit
    assert epochs_of(client, "job") == epochs_of(client, "full")  # the attempt inherited epochs 0-2
    assert [(r.step, r.proximal) for r in resumed.history] == [(r.step, r.proximal) for r in full.history[RESUME_STEP:]]
    assert any(p > 0 for r in full.history[:RESUME_STEP] for p in r.proximal.values())  # the open windows regulated


# -- Hugging Face ---------------------------------------------------------------------------------


class Crash:
    """Raises before a given optimizer step: the process dies there."""

    def __new__(cls, at: int) -> Any:
        from transformers import TrainerCallback

        class _Crash(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == at:
                    raise RuntimeError("simulated crash")

        return _Crash()


def hf_trainer(tmp_path: Path, client: RegulatorClient, job: str, save: str, crash_at: Optional[int] = None,
               restore_callbacks: bool = False) -> Any:
    transformers = pytest.importorskip("transformers")
    InOrder = in_order_trainer()
    model, opt = model_and_optimizer()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / job), per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, max_grad_norm=0.0,
        use_cpu=True, report_to=[], save_strategy=save, save_steps=STEPS, logging_strategy="no", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, seed=0,
        restore_callback_states_from_checkpoint=restore_callbacks,
    )
    return InOrder(
        model=model, args=args, train_dataset=Views(), optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)),
        callbacks=[Crash(crash_at)] if crash_at is not None else None,
        regulator=client, encoders=lambda m: dict(m.encoders), job_id=job, hook_options={"keep_history": True}, **PROFILE,
    )


@pytest.mark.e2e
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize(
    "save, restore_callbacks", [("epoch", False), ("steps", False), ("epoch", True)],
    ids=["saved-at-epoch-end", "saved-at-the-epochs-last-step", "callbacks-restored-by-transformers"],
)
def test_hf_resume_from_checkpoint_continues_regulation(server, tmp_path: Path, save: str, restore_callbacks: bool) -> None:
    """``save_strategy="epoch"`` saves after the epoch closed; ``"steps"`` (every epoch's worth
    of steps) after its last step but before it closed: both resume at epoch 3, step 18. With
    ``restore_callback_states_from_checkpoint`` transformers replaces the state callback by one
    rebuilt from the checkpoint, which must then carry the resumed hook's state."""
    with RegulatorClient.connect(server.target, timeout=30.0) as client:
        full = hf_trainer(tmp_path, client, "full", save="no")
        full.train()
        first = hf_trainer(tmp_path, client, "job", save=save, crash_at=CRASH_STEP)
        with pytest.raises(RuntimeError, match="simulated crash"):
            first.train()
        assert [s[1] for s in steps_of(client, "job")] == list(range(CRASH_STEP))

        checkpoint = tmp_path / "job" / f"checkpoint-{RESUME_STEP}"
        saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["InfoRegCheckpoint"]
        in_epoch = save == "steps"
        position = {k: saved["attributes"]["hook_state"].get(k) for k in ("format", "job_id", "attempt", "modalities", "epoch", "step", "in_epoch")}
        assert position == {"format": 1, "job_id": "job", "attempt": 0, "modalities": ["a", "b"],
                            "epoch": 2 if in_epoch else 3, "step": RESUME_STEP, "in_epoch": in_epoch}

        resumed = hf_trainer(tmp_path, client, "job", save=save, restore_callbacks=restore_callbacks)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert_resumed_like_uninterrupted(client, full.inforeg_hook, resumed.inforeg_hook)
        last = json.loads((tmp_path / "job" / f"checkpoint-{EPOCHS * STEPS}" / "trainer_state.json").read_text())
        hook_state = last["stateful_callbacks"]["InfoRegCheckpoint"]["attributes"]["hook_state"]
        assert (hook_state["attempt"], hook_state["epoch"], hook_state["step"]) == (1, EPOCHS - int(in_epoch), EPOCHS * STEPS)
    assert_same_weights(resumed.model, full.model)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_hf_resume_names_a_checkpoint_of_another_job(tmp_path: Path) -> None:
    """A checkpoint names its job; resuming it under another job_id fails before training."""
    client = RegulatorClient.in_process()
    first = hf_trainer(tmp_path, client, "a", save="epoch", crash_at=STEPS + 1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        first.train()
    other = hf_trainer(tmp_path, client, "b", save="epoch")
    with pytest.raises(ValueError, match="belongs to job 'a'"):
        other.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{STEPS}"))


# -- Accelerate -----------------------------------------------------------------------------------


def accelerate_run(tmp_path: Path, client: RegulatorClient, job: str, resume: Optional[Path] = None,
                   crash_at: Optional[int] = None) -> tuple[InfoRegHook, nn.Module]:
    """The documented recipe: the hook registered for checkpointing, ``save_state`` at every
    epoch's end, ``load_state`` before the session opens, epochs from ``hook.epoch``."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    from regulator_client.microbatch import MicroBatchScores

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = model_and_optimizer()
    loader = DataLoader(Views(), batch_size=BATCH, shuffle=False)
    model, opt, loader = accelerator.prepare(model, opt, loader)
    hook = InfoRegHook(client, dict(accelerator.unwrap_model(model).encoders), job_id=job, keep_history=True, **PROFILE)
    accelerator.register_for_checkpointing(hook)
    if resume is not None:
        accelerator.load_state(str(resume))  # model, optimizer, RNG and the hook's position
    scores = MicroBatchScores(hook)
    with hook:
        for epoch in range(hook.epoch, EPOCHS):
            hook.on_epoch_start(epoch)
            for batch in loader:
                if hook.step == crash_at:
                    raise RuntimeError("simulated crash")
                with accelerator.accumulate(model):
                    out = model(**batch)
                    accelerator.backward(out["loss"])
                    scores.add(out["unimodal_logits"], batch["labels"])
                    if accelerator.sync_gradients:
                        scores.report()
                    opt.step()
                    opt.zero_grad()
            hook.on_epoch_end()
            accelerator.save_state(str(tmp_path / job / f"epoch-{epoch}"))
    return hook, accelerator.unwrap_model(model)


@pytest.mark.e2e
def test_accelerate_load_state_continues_regulation(server, tmp_path: Path) -> None:
    with RegulatorClient.connect(server.target, timeout=30.0) as client:
        full, full_model = accelerate_run(tmp_path, client, "full")
        with pytest.raises(RuntimeError, match="simulated crash"):
            accelerate_run(tmp_path, client, "job", crash_at=CRASH_STEP)
        resumed, resumed_model = accelerate_run(tmp_path, client, "job", resume=tmp_path / "job" / "epoch-2")
        assert_resumed_like_uninterrupted(client, full, resumed)
    assert_same_weights(resumed_model, full_model)
