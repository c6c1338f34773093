"""The inner training loops of :class:`solo_d2.engine.Trainer` (``SOLVER.AMP``).

:func:`build_train_loop` picks one of:

- :class:`CheckedSimpleTrainer`: float32 (Detectron2's ``SimpleTrainer``), also for
  ``SOLVER.AMP.ENABLED`` on a CPU without native bfloat16 (:func:`amp_precision`);
- :class:`CheckedAMPTrainer`: CUDA autocast with a gradient scaler (Detectron2's ``AMPTrainer``);
- :class:`CheckedCPUAutocastTrainer`: CPU autocast in bfloat16, without a scaler (Detectron2's
  ``AMPTrainer`` requires CUDA).

All three stop on a NaN/inf loss *before* the optimizer step, on every rank, with a
``FloatingPointError`` naming the loss term(s), the rank and the iteration
(:func:`check_losses_finite`; Detectron2 only raises on rank 0, so the other ranks would hang).
"""
import math
import time
from typing import Mapping, Optional

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.engine.train_loop import TrainerBase
from detectron2.utils import comm

from ..config import AUTOCAST_DTYPES, autocast_dtype

__all__ = [
    "check_losses_finite",
    "CheckedSimpleTrainer",
    "CheckedAMPTrainer",
    "CheckedCPUAutocastTrainer",
    "amp_precision",
    "build_train_loop",
]


def check_losses_finite(loss_dict: Mapping[str, torch.Tensor], cur_iter: int) -> None:
    """Raise ``FloatingPointError`` on every rank if a loss of any rank is NaN or inf.

    Collective: every rank must call it at the same iteration."""
    losses = {k: float(v.detach()) for k, v in loss_dict.items()}
    all_losses = comm.all_gather(losses)
    bad = [(r, k, v) for r, m in enumerate(all_losses) for k, v in m.items() if not math.isfinite(v)]
    if not bad:
        return
    terms = ", ".join(
        f"{k} = {v}" + (f" (rank {r})" if len(all_losses) > 1 else "") for r, k, v in bad
    )
    raise FloatingPointError(
        f"Loss became infinite or NaN at iteration {cur_iter} (iteration={cur_iter}): {terms}. "
        f"All losses on this rank: {losses}. Training stopped before the optimizer step, so "
        f"the last checkpoint in OUTPUT_DIR is intact; lower SOLVER.BASE_LR, enable gradient "
        f"clipping or check the data, then continue with --resume."
    )


class _FiniteLossMixin:
    """Runs :func:`check_losses_finite` before Detectron2 writes the metrics (same iterations:
    every ``gather_metric_period``), i.e. before the optimizer step."""

    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        cur_iter = self.iter if iter is None else iter
        if (cur_iter + 1) % self.gather_metric_period == 0:
            check_losses_finite(loss_dict, cur_iter)
        super()._write_metrics(loss_dict, data_time, prefix, iter)


class CheckedSimpleTrainer(_FiniteLossMixin, SimpleTrainer):
    """``SimpleTrainer`` that stops on a non-finite loss on every rank."""


class CheckedAMPTrainer(_FiniteLossMixin, AMPTrainer):
    """``AMPTrainer`` (CUDA autocast, gradient scaler) that stops on a non-finite loss on every
    rank."""


class CheckedCPUAutocastTrainer(_FiniteLossMixin, SimpleTrainer):
    """``SimpleTrainer`` whose forward pass (model and losses) runs under CPU autocast in
    ``precision`` (bfloat16), for ``SOLVER.AMP.ENABLED`` on CPU. Parameters, gradients and the
    optimizer stay float32; bfloat16 has float32's exponent range, so gradients need no scaler.
    ``run_step`` is ``SimpleTrainer``'s with the forward pass under autocast (backward and the
    optimizer step stay outside it, as PyTorch recommends)."""

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype = torch.bfloat16):
        super().__init__(model, data_loader, optimizer)
        self.precision = precision

    def run_step(self):
        assert self.model.training, "[CheckedCPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast("cpu", dtype=self.precision):
            loss_dict = self.model(data)
        losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def amp_precision(cfg) -> Optional[torch.dtype]:
    """The autocast dtype of ``SOLVER.AMP`` for ``MODEL.DEVICE``, or None for float32: AMP off,
    or ``SOLVER.AMP.PRECISION = ""`` on a CPU without native bfloat16
    (:func:`solo_d2.config.autocast_dtype` decides and logs why). ``""`` is the device's default:
    float16 on CUDA, bfloat16 on CPU."""
    if not cfg.SOLVER.AMP.ENABLED:
        return None
    cuda = torch.device(cfg.MODEL.DEVICE).type == "cuda"
    name = cfg.SOLVER.AMP.PRECISION or ("float16" if cuda else "bfloat16")
    if name not in AUTOCAST_DTYPES:
        raise ValueError(
            f"SOLVER.AMP.PRECISION = {name!r}: expected 'float16', 'bfloat16' or '' (the device's)"
        )
    return autocast_dtype(
        name, cfg.MODEL.DEVICE, key="SOLVER.AMP.PRECISION", explicit=bool(cfg.SOLVER.AMP.PRECISION)
    )


def build_train_loop(cfg, model, data_loader, optimizer) -> TrainerBase:
    """The inner training loop for ``SOLVER.AMP`` (module docs)."""
    precision = amp_precision(cfg)
    if precision is None:
        return CheckedSimpleTrainer(model, data_loader, optimizer)
    if torch.device(cfg.MODEL.DEVICE).type == "cuda":
        return CheckedAMPTrainer(model, data_loader, optimizer, precision=precision)
    return CheckedCPUAutocastTrainer(model, data_loader, optimizer, precision=precision)
