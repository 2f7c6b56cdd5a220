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

Not covered: resuming from a Trainer checkpoint (``resume_from_checkpoint``) starts a new
regulator history (use the Lightning callback or the plain hook's ``state_dict`` for resumable
jobs); DeepSpeed and FSDP, whose gradients are sharded or hidden from ``param.grad``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Union

from torch import Tensor, nn

try:
    from transformers import Trainer, TrainerCallback
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


class _Lifecycle(TrainerCallback):
    """Trainer events -> hook calls (the callback half of the integration)."""

    def __init__(self, owner: "InfoRegTrainerMixin") -> None:
        self.owner = owner

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner._inforeg_start(args)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner.inforeg_hook.on_epoch_start()  # type: ignore[union-attr]
        self.owner._inforeg_scores.clear()  # type: ignore[union-attr]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner._inforeg_scores.report()  # type: ignore[union-attr]

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner.inforeg_hook.on_epoch_end()  # type: ignore[union-attr]

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.owner._inforeg_close()


class InfoRegTrainerMixin:
    """Put it before ``Trainer`` (or any subclass of it): ``class T(InfoRegTrainerMixin, Seq2SeqTrainer)``.

    Args (keywords, besides the Trainer's own):
        regulator: a ``RegulatorClient``.
        encoders: modality -> encoder module, or a function of the model returning it.
        job_id, profile, profile_params: as for ``InfoRegHook``.
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
        profile: ProfileLike = "paper",
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
        self.add_callback(_Lifecycle(self))  # type: ignore[attr-defined]

    def _inforeg_start(self, args: Any) -> None:
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
        self.inforeg_hook = InfoRegHook(
            self.inforeg_client, encoders, rank=args.process_index, world_size=args.world_size, **amp, **self.inforeg_options
        )
        self._inforeg_scores = MicroBatchScores(self.inforeg_hook)
        self.inforeg_hook.open()

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
