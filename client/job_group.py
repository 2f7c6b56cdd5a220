"""The job's ranks under ``torch.distributed``: which one leads (reports), and the collectives the
hook runs between them. Decided on first use, so a hook may be built before the process group."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


class JobGroup:
    """Rank 0 of ``process_group`` (default: the world) is the job's leader: the only rank that
    talks to the regulator; the others receive each step's answer (and each epoch end) from it."""

    def __init__(self, world_size: int, process_group: Any = None) -> None:
        self.world_size = world_size
        self.process_group = process_group
        self._active: Optional[bool] = None
        self.leader = 0  # the leader's global rank
        self._reports = True

    @property
    def active(self) -> bool:
        """Whether the job runs on several initialised ranks."""
        if self._active is None:
            self._active = False
            if self.world_size > 1:
                import torch.distributed as dist

                self._active = dist.is_available() and dist.is_initialized()
                if self._active:
                    pg = self.process_group
                    self.leader = dist.get_global_rank(pg, 0) if pg is not None else 0
                    self._reports = dist.get_rank() == self.leader
        return self._active

    @property
    def reports(self) -> bool:
        """Whether this process is the leader (always, outside DDP)."""
        self.active  # noqa: B018 (decides)
        return self._reports

    def device(self) -> torch.device:
        """Where the group wants tensors: CUDA for NCCL, the CPU otherwise."""
        import torch.distributed as dist

        if dist.get_backend(self.process_group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce_to_leader(self, local: Tensor) -> Any:
        """Starts summing ``local`` onto the leader (in place there); returns the async work."""
        import torch.distributed as dist

        return dist.reduce(local, dst=self.leader, group=self.process_group, async_op=True)

    def broadcast(self, values: list[float]) -> list[float]:
        """The leader's ``values`` on every rank (float64; one host sync on the others)."""
        import torch.distributed as dist

        box = torch.tensor(values, dtype=torch.float64, device=self.device())
        dist.broadcast(box, src=self.leader, group=self.process_group)
        return values if self._reports else box.tolist()

    def broadcast_object(self, obj: Any) -> Any:
        """The leader's picklable ``obj`` on every rank."""
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=self.leader, group=self.process_group, device=self.device())
        return box[0]
