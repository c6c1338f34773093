"""``Trainer`` (Detectron2's ``DefaultTrainer`` for SOLO) and ``setup_cfg`` (a train_net run's cfg).

``Trainer`` differs from ``DefaultTrainer`` in:

- on CPU, the DDP wrapper gets ``device_ids=None`` (Detectron2 passes the local rank, which only
  works on GPUs), so ``--num-gpus N`` runs N gloo processes on a CPU-only machine; on GPUs it
  behaves exactly like Detectron2 (NCCL, ``device_ids=[local_rank]``): :meth:`Trainer.create_ddp_model`;
- ``SOLVER.TIME_BUDGET_MINUTES``: the schedule fitted to a time budget on this machine
  (:func:`solo_d2.engine.time_budget.fit_to_time_budget`);
- the inner loop (:func:`solo_d2.engine.train_loop.build_train_loop`): ``SOLVER.AMP.ENABLED``
  also works on CPU (bfloat16 autocast where the CPU has native bfloat16, else float32;
  ``SOLVER.AMP.PRECISION``), and a NaN/inf loss stops
  training *before* the optimizer step, on every rank, naming the loss term(s), rank and iteration;
- ``SOLVER.OPTIMIZER`` (SGD or AdamW) and ``SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM`` (clips the L2
  norm of all gradients together, as the reference does; Detectron2 clips per parameter);
- the evaluator is COCO's, for both ``segm`` and ``bbox``;
- ``TEST.TILE.ENABLED``: the evaluation tiles large images (:meth:`Trainer.test`,
  :class:`solo_d2.inference.TiledModel`), the way ``tools/predict.py --tile`` predicts them;
- ``MODEL.SOLO.NUM_CLASSES`` is checked against the training data once it is loaded, and the
  grid coverage of that data (which objects the grids lose, and why) is logged, with a warning
  per loss cause above 5% (:func:`solo_d2.analysis.grid_coverage.log_grid_coverage`);
- the data loaders' mapper names the image file in its errors;
- checkpoints are written atomically and loaded with ``weights_only=True``
  (:class:`solo_d2.checkpoint.SafeDetectionCheckpointer`);
- ``--resume`` also continues the data order where it stopped: the training sampler
  (:class:`solo_d2.data.samplers.ResumableTrainingSampler`, seeded with ``SEED`` when it is >= 0)
  and the number of images consumed are saved in every checkpoint
  (:class:`solo_d2.engine.hooks.DataOrderHook`).
"""
import logging
import os
import weakref

import torch
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine.train_loop import TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..analysis.grid_coverage import log_grid_coverage
from ..checkpoint import SafeDetectionCheckpointer
from ..config import get_solo_cfg
from ..data.checks import check_num_classes
from ..data.mapper import FileNamingDatasetMapper
from ..data.samplers import ResumableTrainingSampler
from .hooks import DataOrderHook
from .time_budget import fit_to_time_budget
from .train_loop import build_train_loop

__all__ = ["Trainer", "setup_cfg", "create_ddp_model", "add_full_model_gradient_clipping"]

# Under "detectron2" so that the messages reach Detectron2's log handlers (stdout, log.txt).
logger = logging.getLogger("detectron2.solo_d2.engine")


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
    """``DefaultTrainer`` for SOLO (module docs).

    ``__init__`` cannot reuse ``DefaultTrainer.__init__``: that one hard-codes three objects with
    no hook point to replace them, and fails before any override could run: Detectron2's
    module-level ``create_ddp_model`` (``device_ids=[local_rank]``, which DDP refuses for a CPU
    model), ``AMPTrainer`` / ``SimpleTrainer`` (CUDA-only AMP, no finite-loss check on every
    rank) and ``DetectionCheckpointer`` (which the checkpoint hook captures). So ``__init__``
    keeps ``DefaultTrainer``'s order of construction and builds those three through overridable
    methods: :meth:`create_ddp_model`, :meth:`build_train_loop` and :meth:`build_checkpointer`.
    Everything else (``build_model``, ``build_optimizer``, ``build_train_loader``,
    ``build_hooks``, ``train``, ``test``) is ``DefaultTrainer``'s API.
    """

    def __init__(self, cfg):
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = self.auto_scale_workers(cfg, comm.get_world_size())
        cfg = fit_to_time_budget(type(self), cfg)  # SOLVER.TIME_BUDGET_MINUTES (0: unchanged)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # The resumable sampler, when build_train_loader made one (SAMPLER_TRAIN TrainingSampler).
        self._train_sampler = getattr(data_loader, "solo_resumable_sampler", None)
        model = self.create_ddp_model(model)
        self._trainer = self.build_train_loop(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model)
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def create_ddp_model(cls, model):
        """The model in DDP when there are several processes (:func:`create_ddp_model`)."""
        return create_ddp_model(model, broadcast_buffers=False)

    @classmethod
    def build_train_loop(cls, cfg, model, data_loader, optimizer):
        """The inner loop (:func:`solo_d2.engine.train_loop.build_train_loop`)."""
        return build_train_loop(cfg, model, data_loader, optimizer)

    def build_checkpointer(self, cfg, model):
        """:class:`SafeDetectionCheckpointer` writing to ``OUTPUT_DIR``, saving this trainer's state.
        ``strict_heads=False``: fine-tuning may re-initialise head parameters (one warning lists
        them), e.g. the category conv for another ``NUM_CLASSES``."""
        return SafeDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, strict_heads=False, trainer=weakref.proxy(self)
        )

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD (``SOLVER.OPTIMIZER = "SGD"``) or AdamW (``"ADAMW"``), with the same
        per-parameter groups (weight decay of norms and biases, bias LR factor), plus whole-model
        gradient clipping when ``SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM > 0``."""
        name = cfg.SOLVER.OPTIMIZER.upper()
        if name == "SGD":
            optimizer = d2_build_optimizer(cfg, model)
        elif name == "ADAMW":
            params = get_default_optimizer_params(
                model,
                base_lr=cfg.SOLVER.BASE_LR,
                weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
                weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
            )
            optimizer = maybe_add_gradient_clipping(cfg, torch.optim.AdamW(
                params,
                lr=cfg.SOLVER.BASE_LR,
                betas=tuple(cfg.SOLVER.BETAS),
                weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            ))
        else:
            raise ValueError(
                f"SOLVER.OPTIMIZER = {cfg.SOLVER.OPTIMIZER!r}: expected 'SGD' or 'ADAMW'"
            )
        max_norm = cfg.SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM
        if max_norm > 0:
            if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
                raise ValueError(
                    "SOLVER.CLIP_GRADIENTS.ENABLED and SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM are "
                    "both set: choose one way of clipping gradients"
                )
            optimizer.__class__ = add_full_model_gradient_clipping(optimizer.__class__, max_norm)
        return optimizer

    def build_hooks(self):
        ret = super().build_hooks()
        if self._train_sampler is not None:
            ret.insert(0, DataOrderHook(self._train_sampler, self.cfg.SOLVER.IMS_PER_BATCH))
        else:
            logger.warning(
                f"DATALOADER.SAMPLER_TRAIN = {self.cfg.DATALOADER.SAMPLER_TRAIN!r}: on --resume the "
                "data order restarts from the beginning of the sampler stream"
            )
        return ret

    @classmethod
    def build_train_loader(cls, cfg):
        """Detectron2's train loader with the file-naming mapper and, for ``SAMPLER_TRAIN =
        "TrainingSampler"``, a :class:`ResumableTrainingSampler` seeded with ``SEED`` (when >= 0;
        else with a random seed shared by the ranks, like Detectron2). That sampler is the
        loader's ``solo_resumable_sampler`` attribute."""
        # Loading the datasets sets their metadata (thing_classes).
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        )
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        if comm.is_main_process():  # which objects the grids lose (solo_d2/analysis)
            log_grid_coverage(cfg, dataset, logger)
        sampler = None
        if cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
            seed = int(cfg.SEED) if cfg.SEED >= 0 else comm.shared_random_seed()
            sampler = ResumableTrainingSampler(len(dataset), seed=seed)
        loader = build_detection_train_loader(
            cfg, mapper=FileNamingDatasetMapper(cfg, True), dataset=dataset, sampler=sampler
        )
        if sampler is not None:
            loader.solo_resumable_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with the file-naming mapper; with ``TEST.TILE.ENABLED``
        the images keep their own size (the tiler resizes each tile, or a small image, to the
        test size)."""
        extra = {"augmentations": []} if cfg.TEST.TILE.ENABLED else {}
        return build_detection_test_loader(
            cfg, dataset_name, mapper=FileNamingDatasetMapper(cfg, False, **extra)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO's evaluator (segm and bbox); with ``TEST.TILE.ENABLED`` it counts up to
        ``max(100, TEST.TILE.MAX_PER_IMAGE)`` detections per image."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        max_dets = max(100, cfg.TEST.TILE.MAX_PER_IMAGE) if cfg.TEST.TILE.ENABLED else None
        return DatasetEvaluators(
            [COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder,
                           max_dets_per_image=max_dets)]
        )

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """``DefaultTrainer.test``; with ``TEST.TILE.ENABLED`` the model's inference tiles the
        large images (:class:`solo_d2.inference.TiledModel`, the ``TEST.TILE`` keys checked
        first), as ``tools/predict.py --tile`` does."""
        if cfg.TEST.TILE.ENABLED:
            from ..inference import TiledModel

            model = TiledModel(cfg, model)
        return super().test(cfg, model, evaluators)


def setup_cfg(args, extra_opts=()):
    """The frozen cfg of a ``train_net.py`` run: :func:`solo_d2.get_solo_cfg` of
    ``--config-file`` with ``extra_opts`` (e.g. the custom datasets' options) then ``args.opts``,
    and Detectron2's ``default_setup`` (logging, OUTPUT_DIR, seed)."""
    cfg = get_solo_cfg(args.config_file, list(extra_opts) + list(args.opts))
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
