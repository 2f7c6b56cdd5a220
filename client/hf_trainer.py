"""InfoReg regulation for a Hugging Face ``transformers.Trainer``.

    from regulator_client.hf_trainer import InfoRegTrainer      # or InfoRegTrainerMixin

    trainer = InfoRegTrainer(
        model=model, args=TrainingArguments(..., max_grad_norm=0.0), train_dataset=ds,
        regulator=RegulatorClient.connect("127.0.0.1:50051"),
        encoders=lambda m: {"audio": m.audio_net, "visual": m.visual_net},
        job_id="av-hf-1", profile="official", profile_params={"reference_modality": "audio"},
    )
    trainer.train()

The model's forward returns the loss as usual plus the unimodal logits: by default the output's
``unimodal_logits`` entry (a mapping modality -> ``[B, C]``); pass ``unimodal_logits=fn(outputs)``
for another layout, ``label_key`` if the labels are not ``inputs["labels"]``.

Why a Trainer subclass: ``TrainerCallback`` hooks never see the model's outputs, so the scores
cannot come from a callback. ``compute_loss`` (training only) collects each micro-batch's scores;
an internal callback reports them once per optimizer step in ``on_pre_optimizer_step`` - after
the accumulated backward passes, after the Trainer's gradient clipping (``max_grad_norm``; the
released InfoReg code does not clip, so set it to 0 to match it) and its unscaling of fp16
gradients, before ``optimizer.step()``. Epochs follow ``on_epoch_begin``/``on_epoch_end``; the
hook is built at ``on_train_begin`` (the model sits on its device by then; rank and world size
come from ``TrainingArguments``) and closed when training ends or fails.

**Training logs.** Every training log entry (``logging_strategy``) carries ``hook.metrics()``:
``inforeg/<modality>/proximal``, ``.../window_open``, ``.../fisher_trace``, ``inforeg/fallbacks/...``
(see ``regulator_client.training_metrics``), so ``trainer.state.log_history`` and every
``report_to`` backend get them; an epoch end always logs (unless ``logging_strategy="no"``).

**Resume.** ``trainer.train(resume_from_checkpoint=...)`` continues the regulator's session where
the checkpoint stands. The hook's ``state_dict`` (job, attempt, next epoch and step) travels in
each checkpoint's ``trainer_state.json`` through transformers' stateful callbacks
(``InfoRegCheckpoint``, an ``ExportableState``); the resumed run opens the job's next attempt at
that epoch, which inherits the closed epochs before it, so its coefficients are those of an
uninterrupted run. A checkpoint names its job: pass the same ``job_id``, or none.

Not covered: DeepSpeed and FSDP, whose gradients are sharded or hidden from ``param.grad``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Union

from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
    from transformers.trainer_callback import ExportableState
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError("regulator_client.hf_trainer needs Hugging Face transformers: pip install transformers") from exc

from .client import RegulatorClient
from .hook import InfoRegHook
from .microbatch import MicroBatchScores
from .profiles import ProfileLike

log = logging.getLogger(__name__)

Encoders = Union[Mapping[str, nn.Module], Callable[[nn.Module], Mapping[str, nn.Module]]]


def default_unimodal_logits(outputs: Any) -> Mapping[str, Tensor]:
    """``outputs["unimodal_logits"]`` (a dict or a ``ModelOutput`` field)."""
    try:
        logits = outputs["unimodal_logits"]
    except (KeyError, TypeError):
        raise RuntimeError(
            "InfoRegTrainer: the model's output has no 'unimodal_logits' (modality -> logits); return it from "
            "forward() or pass unimodal_logits=fn(outputs)"
        ) from None
    return logits


class InfoRegCheckpoint(TrainerCallback, ExportableState):
    """Carries the hook's ``state_dict`` in every Trainer checkpoint (``trainer_state.json``,
    ``stateful_callbacks``), where ``resume_from_checkpoint`` finds it. Added by the mixin."""

    def __init__(self) -> None:
        self.hook: Optional[InfoRegHook] = None

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"hook_state": self.hook.state_dict() if self.hook is not None else {}}}


def saved_hook_state(state: Any) -> Optional[dict[str, Any]]:
    """The hook state in a (resumed) ``TrainerState``; None in a fresh run or a checkpoint
    without one. A fresh run's state is at step 0; a checkpoint's is past it."""
    if not state.global_step:
        return None
    entry = (state.stateful_callbacks or {}).get(InfoRegCheckpoint.__name__)
    if isinstance(entry, list):  # transformers keeps a list for several callbacks of one class
        entry = entry[0] if entry else None
    saved = ((entry or {}).get("attributes") or {}).get("hook_state")
    return dict(saved) if saved else None


class _Lifecycle(TrainerCallback):
    """Trainer events -> hook calls (the callback half of the integration)."""

    def __init__(self, owner: "InfoRegTrainerMixin") -> None:
        self.owner = owner

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner._inforeg_start(args, state)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner.inforeg_hook.on_epoch_start()  # type: ignore[union-attr]
        self.owner._inforeg_scores.clear()  # type: ignore[union-attr]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner._inforeg_scores.report()  # type: ignore[union-attr]

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner.inforeg_hook.on_epoch_end()  # type: ignore[union-attr]
        if args.logging_strategy == "no":
            return
        # the closed epoch's Fisher traces and windows reach the logs: with the Trainer's own entry
        # at the epoch's end, or in one of their own where that step was logged before the epoch closed
        if self.owner._inforeg_logged_step == state.global_step:
            self.owner.log({})
        else:
            control.should_log = True

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner._inforeg_close()


class InfoRegTrainerMixin:
    """Put it before ``Trainer`` (or any subclass of it): ``class T(InfoRegTrainerMixin, Seq2SeqTrainer)``.

    Args (keywords, besides the Trainer's own):
        regulator: a ``RegulatorClient``.
        encoders: modality -> encoder module, or a function of the model returning it.
        job_id, profile, profile_params: as for ``InfoRegHook`` (which also reads the environment
            switches ``REGULATOR_ON_UNAVAILABLE`` and ``REGULATOR_DISABLED``).
        unimodal_logits: ``fn(outputs) -> {modality: logits}`` (default: ``outputs["unimodal_logits"]``).
        label_key: where the labels are in the inputs (default ``"labels"``).
        hook_options: any other ``InfoRegHook`` keyword (``attempt``, ``record``, ``keep_history``,
            ``on_unavailable``, ...).
    """

    def __init__(
        self,
        *args: Any,
        regulator: RegulatorClient,
        encoders: Encoders,
        job_id: Optional[str] = None,
        profile: ProfileLike = None,  # None: the hook's default (official for two modalities)
        profile_params: Optional[Mapping[str, Any]] = None,
        unimodal_logits: Callable[[Any], Mapping[str, Tensor]] = default_unimodal_logits,
        label_key: str = "labels",
        hook_options: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.inforeg_client = regulator
        self.inforeg_encoders = encoders
        self.inforeg_options: dict[str, Any] = dict(job_id=job_id, profile=profile, profile_params=profile_params, **(hook_options or {}))
        self.inforeg_unimodal_logits = unimodal_logits
        self.inforeg_label_key = label_key
        self.inforeg_hook: Optional[InfoRegHook] = None
        self._inforeg_scores: Optional[MicroBatchScores] = None
        self._inforeg_logged_step = -1  # the global step of the last training log entry
        self.add_callback(_Lifecycle(self))  # type: ignore[attr-defined]
        self.add_callback(InfoRegCheckpoint())  # type: ignore[attr-defined]

    def _inforeg_start(self, args: Any, state: Any) -> None:
        model = self.model  # type: ignore[attr-defined]  # the unwrapped model, on its device
        enc = self.inforeg_encoders
        encoders = enc if isinstance(enc, (Mapping, nn.Module)) else enc(model)
        amp: dict[str, Any] = {}
        scaler = getattr(self.accelerator, "scaler", None)  # type: ignore[attr-defined]  # fp16 only
        if scaler is not None and scaler.is_enabled() and "grad_scaler" not in self.inforeg_options:
            from accelerate.optimizer import AcceleratedOptimizer

            opt = self.optimizer  # type: ignore[attr-defined]
            while isinstance(opt, AcceleratedOptimizer):  # the scaler keys its state by the torch optimizer
                opt = opt.optimizer
            amp = dict(grad_scaler=scaler, optimizer=opt)  # steps the scaler will skip are not reported
        options = dict(self.inforeg_options)
        saved = saved_hook_state(state)
        if saved is not None and not options.get("job_id"):  # the checkpoint names its job
            options["job_id"] = saved.get("job_id")
        hook = self.inforeg_hook = InfoRegHook(
            self.inforeg_client, encoders, rank=args.process_index, world_size=args.world_size, **amp, **options
        )
        self._inforeg_scores = MicroBatchScores(hook)
        for cb in self.callback_handler.callbacks:  # type: ignore[attr-defined]  # ours, or the one transformers restored
            if isinstance(cb, InfoRegCheckpoint):
                cb.hook = hook
        if saved is not None:
            self._inforeg_resume(hook, saved, int(state.epoch or 0))
        elif state.global_step:
            log.warning(
                "InfoRegTrainer: the checkpoint holds no regulator state (saved without InfoRegTrainer?): "
                "regulation starts a new history at epoch 0"
            )
        hook.open()

    @staticmethod
    def _inforeg_resume(hook: InfoRegHook, saved: dict[str, Any], trainer_epoch: int) -> None:
        """Puts the hook where the checkpoint stands, at the epoch the Trainer resumes in."""
        if saved.get("in_epoch") and trainer_epoch == int(saved.get("epoch", 0)) + 1:
            # saved after an epoch's last step, before its end: the Trainer resumes with the next
            # epoch, and so does the session (the interrupted run closed that epoch, or its record
            # lacks the end)
            saved.update(epoch=trainer_epoch, in_epoch=False)
        hook.load_state_dict(saved)
        if hook.epoch != trainer_epoch:
            raise RuntimeError(
                f"InfoRegTrainer: the Trainer resumes at epoch {trainer_epoch} but the checkpoint's regulator "
                f"state at epoch {hook.epoch}"
            )
        log.info("InfoRegTrainer: resuming job %s at epoch %d, step %d", hook.identity.job_id, hook.epoch, hook.step)

    def _inforeg_close(self) -> None:
        if self.inforeg_hook is not None:
            self.inforeg_hook.close()

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        labels = inputs.get(self.inforeg_label_key)  # before the Trainer may pop it
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)  # type: ignore[misc]
        if model.training and self._inforeg_scores is not None and loss.requires_grad:
            if labels is None:
                raise RuntimeError(f"InfoRegTrainer: the inputs have no {self.inforeg_label_key!r} (pass label_key=...)")
            self._inforeg_scores.add(self.inforeg_unimodal_logits(outputs), labels)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """``Trainer.log`` with the regulation's scalars in every training step's entry (the one
        with the ``loss``) and in the epoch end's own (empty) one; not in evaluation's or in the
        closing summary."""
        hook = self.inforeg_hook
        if hook is not None and ("loss" in logs or not logs):
            logs.update(hook.metrics())
            self._inforeg_logged_step = self.state.global_step  # type: ignore[attr-defined]
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    def train(self, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; the regulator session is closed also when training fails."""
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            if self.inforeg_hook is not None:
                try:
                    self.inforeg_hook.close()
                except Exception:  # the regulator may be why we are here
                    log.warning("InfoRegTrainer: closing the session failed", exc_info=True)
            raise


class InfoRegTrainer(InfoRegTrainerMixin, Trainer):
    """``transformers.Trainer`` with InfoReg regulation (see the module docstring)."""
