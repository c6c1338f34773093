"""Training and evaluation with Detectron2's engine: ``Trainer`` and ``setup_cfg``.

``Trainer`` is Detectron2's ``DefaultTrainer`` with four differences:

- on CPU, the DDP wrapper gets ``device_ids=None`` (Detectron2 passes the local rank, which only
  works on GPUs), so ``--num-gpus N`` runs N gloo processes on a CPU-only machine; on GPUs it
  behaves exactly like Detectron2 (NCCL, ``device_ids=[local_rank]``);
- ``SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM`` clips the L2 norm of all gradients together, as the
  reference does (Detectron2's own clipping works per parameter);
- the evaluator is COCO's, for both ``segm`` and ``bbox``;
- ``MODEL.SOLO.NUM_CLASSES`` is checked against the training data once it is loaded.
"""
import logging
import os
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .config import add_solo_config
from .modeling.meta_arch import check_num_classes

__all__ = ["Trainer", "setup_cfg", "create_ddp_model", "add_full_model_gradient_clipping"]

logger = logging.getLogger(__name__)


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Detectron2's ``create_ddp_model`` that also works on CPU (gloo): ``device_ids=None``
    for a CPU model, ``[local_rank]`` for a CUDA model. Returns ``model`` itself for one process."""
    if comm.get_world_size() == 1:
        return model
    if "device_ids" not in kwargs:
        on_cuda = next(model.parameters()).device.type == "cuda"
        kwargs["device_ids"] = [comm.get_local_rank()] if on_cuda else None
    return DistributedDataParallel(model, **kwargs)


def add_full_model_gradient_clipping(optimizer_cls, max_norm: float):
    """A subclass of ``optimizer_cls`` whose ``step`` first clips the L2 norm of all gradients
    (over every param group together) to ``max_norm``."""

    class FullModelGradientClippingOptimizer(optimizer_cls):
        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, max_norm)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = optimizer_cls.__name__ + "WithFullModelClipping"
    return FullModelGradientClippingOptimizer


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # DefaultTrainer.__init__, with solo_d2's create_ddp_model (device_ids=None on CPU).
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_optimizer(cls, cfg, model):
        optimizer = d2_build_optimizer(cfg, model)
        max_norm = cfg.SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM
        if max_norm > 0:
            if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
                raise ValueError(
                    "SOLVER.CLIP_GRADIENTS.ENABLED and SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM are "
                    "both set: choose one way of clipping gradients"
                )
            optimizer.__class__ = add_full_model_gradient_clipping(optimizer.__class__, max_norm)
        return optimizer

    @classmethod
    def build_train_loader(cls, cfg):
        loader = super().build_train_loader(cfg)  # loads the datasets (sets their metadata)
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        return loader

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators(
            [COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)]
        )


def setup_cfg(args):
    """Build the frozen cfg of a ``train_net.py`` run: Detectron2 defaults + solo_d2's keys +
    ``--config-file`` + ``opts``; falls back to the CPU (with a warning) when CUDA is absent."""
    cfg = get_cfg()
    add_solo_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("CUDA is not available: MODEL.DEVICE set to cpu")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
