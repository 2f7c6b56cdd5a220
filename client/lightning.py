"""``InfoRegCallback``: InfoReg regulation for a PyTorch Lightning ``Trainer``.

    class Net(L.LightningModule):
        def training_step(self, batch, batch_idx):
            x_a, x_v, y = batch
            fused, uni = self.model({"audio": x_a, "visual": x_v})
            self.inforeg_logits, self.inforeg_labels = uni, y      # the protocol (see below)
            return F.cross_entropy(fused, y)

    cb = InfoRegCallback(RegulatorClient.connect("127.0.0.1:50051"),
                         lambda m: {"audio": m.model.audio_net, "visual": m.model.visual_net},
                         job_id="av-run-7", profile="official")
    L.Trainer(callbacks=[cb], ...).fit(net)

**Protocol.** In ``training_step`` the module stores ``self.inforeg_logits`` - the unimodal
logits of the batch, a mapping modality -> ``[B, C]`` tensor (or a sequence in the encoders'
order) - and ``self.inforeg_labels`` (``[B]`` class indices). The callback reads and clears both
after every backward, so a step that forgets to set them fails loudly instead of reusing the
previous batch's.

**Where the hook runs.** Lightning runs ``training_step`` and ``backward`` inside the optimizer's
closure and calls ``on_before_optimizer_step`` right after the closure, before the step (and
before gradient clipping, which then clips the regulated gradient). ``on_after_backward`` runs
after *every* backward, including the micro-batches of gradient accumulation that do not step.
So the callback only collects each micro-batch's scores in ``on_after_backward`` and reports in
``on_before_optimizer_step``, once per optimizer step: the report covers every sample of the
accumulated gradient, and the Fisher terms and the proximal term see the gradient that is about
to be applied. A step whose closure ran no backward (``training_step`` returned ``None``) is not
reported. Under ``precision="16-mixed"`` the gradients are already unscaled in that hook, and
the callback hands the trainer's ``GradScaler`` to the hook, which leaves out (neither regulates,
reports nor counts) a step the scaler will skip for inf/NaN gradients; ``"bf16-mixed"`` needs no
scaler.

Lightning lifecycle -> hook: ``on_fit_start`` builds the ``InfoRegHook`` (the model is on its
device by then); ``on_train_start`` opens the session (after Lightning restored a checkpoint);
``on_train_epoch_start`` snapshots the anchors; ``on_train_epoch_end`` ends the epoch;
``on_fit_end`` (or ``on_exception``) closes. Rank and world size come from the trainer; under DDP
every rank must use the same ``job_id`` (pass it, or set ``REGULATOR_JOB_ID``). One optimizer over
the encoders is assumed.

**Checkpoints.** The callback's ``state_dict`` (the hook's: job, attempt, next epoch and step) is
saved in every Lightning checkpoint, so ``trainer.fit(module, ckpt_path=...)`` continues the job:
the session resumes at the checkpoint's epoch and step as the job's next attempt, which inherits
the closed epochs before it - the coefficients are those of an uninterrupted fit
(``tests/test_lightning.py``). Give the resumed callback the same ``job_id``. A checkpoint saved
after an epoch's last step but before its end (``ModelCheckpoint(save_on_train_epoch_end=False)``,
after validation) resumes at the next epoch, exactly too, provided the interrupted fit got to
close that epoch. A checkpoint taken with batches of the epoch left (``every_n_train_steps``)
resumes inside it: the regulator's record of that epoch then covers only the steps after the
resume, and its anchors are the resumed weights.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

try:  # the unified package first, then the standalone one
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError as exc:
        raise ImportError("regulator_client.lightning needs PyTorch Lightning: pip install lightning") from exc

from inforeg.regulator.v1 import regulator_pb2 as pb

from .client import RegulatorClient
from .hook import InfoRegHook
from .profiles import ProfileLike

log = logging.getLogger(__name__)

Encoders = Union[Mapping[str, nn.Module], Callable[["pl.LightningModule"], Mapping[str, nn.Module]]]
LOGITS_ATTR = "inforeg_logits"
LABELS_ATTR = "inforeg_labels"


class InfoRegCallback(pl.Callback):
    """Reports every optimizer step to a regulator and applies its proximal coefficients.

    Args:
        client: a ``RegulatorClient`` (remote or in-process).
        encoders: modality -> encoder module, or a function of the LightningModule returning it
            (resolved at fit start, once the model sits on its device).
        job_id, attempt: the session; ``None`` = the torchrun environment (``JobIdentity``).
        profile, profile_params: the regulation profile, as for ``InfoRegHook``. The environment
            switches (``REGULATOR_ON_UNAVAILABLE``, ``REGULATOR_DISABLED``) apply: the hook reads them.
        log_metrics: log ``hook.metrics()`` at each epoch end through ``pl_module.log``
            (``inforeg/<modality>/{fisher_trace, window_open, mean_proximal, proximal, ...}``,
            ``inforeg/fallbacks/...``: the keys of ``regulator_client.training_metrics``).
        hook_options: any other ``InfoRegHook`` keyword (``record``, ``keep_history``,
            ``close_session``, ``process_group``, ...); rank and world size come from the trainer.
    """

    def __init__(
        self,
        client: RegulatorClient,
        encoders: Encoders,
        *,
        job_id: Optional[str] = None,
        attempt: Optional[int] = None,
        profile: ProfileLike = None,  # None: the hook's default (official for two modalities)
        profile_params: Optional[Mapping[str, Any]] = None,
        log_metrics: bool = True,
        **hook_options: Any,
    ) -> None:
        super().__init__()
        self.client = client
        self.encoders = encoders
        self.hook_options: dict[str, Any] = dict(
            job_id=job_id, attempt=attempt, profile=profile, profile_params=profile_params, **hook_options
        )
        self.log_metrics = log_metrics
        self.hook: Optional[InfoRegHook] = None
        self.last_epoch_end: Optional[pb.EndEpochResponse] = None  # the regulator's answer to the last epoch
        self._resume: Optional[dict[str, Any]] = None  # a checkpoint's state, applied at train start
        self._inside: Optional[dict[str, Any]] = None  # a state saved inside an epoch, until Lightning shows where it resumed
        self._scores: Optional[Tensor] = None  # score sums of the micro-batches since the last step
        self._count = 0

    # -- lifecycle ------------------------------------------------------------------------------

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        enc = self.encoders  # an nn.ModuleDict is a mapping too, but also callable
        encoders = enc if isinstance(enc, (Mapping, nn.Module)) else enc(pl_module)
        amp: dict[str, Any] = {}
        scaler = getattr(trainer.precision_plugin, "scaler", None)  # precision="16-mixed" only
        if scaler is not None and "grad_scaler" not in self.hook_options and trainer.optimizers:
            # Lightning unscales before on_before_optimizer_step; with the scaler the hook also
            # leaves out the steps the scaler will skip (inf/NaN gradients)
            amp = dict(grad_scaler=scaler, optimizer=trainer.optimizers[0])
        self.hook = InfoRegHook(
            self.client, encoders, rank=trainer.global_rank, world_size=trainer.world_size, **amp, **self.hook_options
        )

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Opens the session; a restored checkpoint (``load_state_dict`` ran by now, whatever the
        strategy) resumes it where the checkpoint stands."""
        hook = self._require_hook()
        if self._resume is not None:
            state, self._resume = dict(self._resume), None
            if state.get("in_epoch") and trainer.current_epoch == state.get("epoch", 0) + 1:
                # saved after the epoch's last step but before its end; Lightning resumes with
                # the next epoch, and so does the session
                state.update(epoch=trainer.current_epoch, in_epoch=False)
            if state.get("in_epoch") and trainer.current_epoch == state.get("epoch"):
                # Lightning resumes inside the epoch, without on_train_epoch_start: the next event
                # says whether batches remain (on_after_backward) or not (on_train_epoch_end)
                self._inside = state
                return
            hook.load_state_dict(state)
        self._open_at(trainer.current_epoch)

    def _open_at(self, epoch: int) -> None:
        hook = self._require_hook()
        if hook.epoch != epoch:
            raise RuntimeError(
                f"InfoRegCallback: the trainer is at epoch {epoch} but the regulator's session at epoch "
                f"{hook.epoch}; resume from a checkpoint that holds this callback's state"
            )
        hook.open()

    def _resume_inside(self, batches_remain: bool) -> None:
        """A checkpoint taken inside an epoch. With batches left the session resumes inside it
        (its record of the epoch holds the steps from here, the anchors are these weights);
        without, the epoch was complete and closed by the interrupted attempt: the session
        resumes at the next one."""
        state, self._inside = dict(self._inside or {}), None
        hook = self._require_hook()
        if batches_remain:
            hook.load_state_dict(state)
            self._open_at(state["epoch"])
            hook.on_epoch_start(state["epoch"])
        else:
            state.update(epoch=state["epoch"] + 1, in_epoch=False)
            hook.load_state_dict(state)  # opened by the next on_train_epoch_start

    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._require_hook().on_epoch_start(trainer.current_epoch)
        self._scores, self._count = None, 0

    def on_after_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._inside is not None:
            self._resume_inside(batches_remain=True)
        hook = self._require_hook()
        logits = getattr(pl_module, LOGITS_ATTR, None)
        labels = getattr(pl_module, LABELS_ATTR, None)
        if logits is None or labels is None:
            raise RuntimeError(
                f"InfoRegCallback: training_step must set self.{LOGITS_ATTR} (unimodal logits per "
                f"modality) and self.{LABELS_ATTR} (the batch's labels) before returning the loss"
            )
        setattr(pl_module, LOGITS_ATTR, None)
        setattr(pl_module, LABELS_ATTR, None)
        # The hook's own reduction (same validation, order and float64 sums as its logits path).
        local = hook.local_scores(logits, labels)[:-1]
        self._scores = local if self._scores is None else self._scores + local
        self._count += int(labels.numel())

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        if self._scores is None:  # the closure ran no backward: nothing to regulate
            return
        hook = self._require_hook()
        scores, count = self._scores, self._count
        self._scores, self._count = None, 0
        hook.after_backward(scores=dict(zip(hook.modalities, scores.unbind())), count=count)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._inside is not None:  # resumed at the end of an epoch the last attempt closed
            self._resume_inside(batches_remain=False)
            return
        self.last_epoch_end = end = self._require_hook().on_epoch_end()
        if self.log_metrics and end is not None:  # to the trainer's loggers (TensorBoard, W&B, ...) and callback_metrics
            # every rank holds the same values; sync_dist only keeps Lightning from warning under DDP
            opts = dict(on_epoch=True, sync_dist=trainer.world_size > 1)
            for key, value in self._require_hook().metrics().items():  # the keys every integration logs
                pl_module.log(key, value, **opts)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.hook is not None:
            self.hook.close()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Closes the trace and the session, as ``with hook:`` does; never masks the error."""
        if self.hook is None:
            return
        try:
            self.hook.close()
        except Exception:  # the regulator may be the reason we are here
            log.warning("InfoRegCallback: closing the session after %r failed", exception, exc_info=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The hook's position (job, attempt, next epoch and step), saved in Lightning checkpoints."""
        pending = self._resume or self._inside
        if pending is not None:  # restored but not yet applied
            return dict(pending)
        return self.hook.state_dict() if self.hook is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Kept until ``on_train_start``, which resumes the session from it."""
        self._resume = dict(state_dict) if state_dict else None

    # -- helpers --------------------------------------------------------------------------------

    def _require_hook(self) -> InfoRegHook:
        if self.hook is None:
            raise RuntimeError("InfoRegCallback: the hook is created in on_fit_start (use it with Trainer.fit)")
        return self.hook

    @property
    def history(self) -> Sequence[Any]:
        """The hook's ``StepResult`` per step (with ``keep_history=True``)."""
        return self.hook.history if self.hook is not None else ()
