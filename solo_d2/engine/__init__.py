"""Training with Detectron2's engine: :class:`Trainer`, :func:`setup_cfg`, the inner loops
(:mod:`.train_loop`) and :class:`DataOrderHook` (:mod:`.hooks`)."""
from .defaults import Trainer, add_full_model_gradient_clipping, create_ddp_model, setup_cfg
from .hooks import DataOrderHook
from .time_budget import fit_to_time_budget, measure_step_time
from .train_loop import (
    CheckedAMPTrainer,
    CheckedCPUAutocastTrainer,
    CheckedSimpleTrainer,
    amp_precision,
    build_train_loop,
)

__all__ = [
    "Trainer",
    "setup_cfg",
    "create_ddp_model",
    "add_full_model_gradient_clipping",
    "DataOrderHook",
    "fit_to_time_budget",
    "measure_step_time",
    "build_train_loop",
    "amp_precision",
    "CheckedSimpleTrainer",
    "CheckedAMPTrainer",
    "CheckedCPUAutocastTrainer",
]
