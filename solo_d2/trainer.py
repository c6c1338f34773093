"""Training and evaluation with Detectron2's engine: ``Trainer`` and ``setup_cfg``.

``Trainer`` is Detectron2's ``DefaultTrainer`` with these differences:

- on CPU, the DDP wrapper gets ``device_ids=None`` (Detectron2 passes the local rank, which only
  works on GPUs), so ``--num-gpus N`` runs N gloo processes on a CPU-only machine; on GPUs it
  behaves exactly like Detectron2 (NCCL, ``device_ids=[local_rank]``);
- ``SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM`` clips the L2 norm of all gradients together, as the
  reference does (Detectron2's own clipping works per parameter);
- the evaluator is COCO's, for both ``segm`` and ``bbox``;
- ``MODEL.SOLO.NUM_CLASSES`` is checked against the training data once it is loaded;
- the data loaders' mapper names the image file in its errors (a truncated or unreadable image
  fails with its path, not with a bare PIL error);
- checkpoints are written atomically and loaded with ``weights_only=True``
  (:class:`solo_d2.checkpoint.SafeDetectionCheckpointer`);
- ``--resume`` also continues the data order where it stopped: the training sampler
  (:class:`solo_d2.checkpoint.ResumableTrainingSampler`, seeded with ``SEED`` when it is >= 0) and
  the number of images consumed are saved in every checkpoint (:class:`DataOrderHook`);
- ``SOLVER.AMP.ENABLED`` also works on CPU: the forward pass runs under CPU autocast in bfloat16
  (``SOLVER.AMP.PRECISION``); on CUDA it is Detectron2's ``AMPTrainer``;
- a NaN/inf loss stops training *before* the optimizer step, on every rank, with a
  ``FloatingPointError`` naming the loss term(s), the rank and the iteration.
"""
import logging
import math
import os
import time
import weakref

import numpy as np
import torch
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data.build import _train_loader_from_config
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, default_setup
from detectron2.engine.train_loop import HookBase, TrainerBase
from detectron2.evaluation import COCOEvaluator, DatasetEvaluators
from detectron2.solver import build_optimizer as d2_build_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import ResumableTrainingSampler, SafeDetectionCheckpointer
from .config import add_solo_config
from .data.mapper import FileNamingDatasetMapper
from .modeling.meta_arch import check_num_classes

__all__ = [
    "Trainer",
    "setup_cfg",
    "create_ddp_model",
    "add_full_model_gradient_clipping",
    "DataOrderHook",
    "build_train_loop",
    "amp_precision",
]

logger = logging.getLogger(__name__)
# Under "detectron2" so that the messages reach Detectron2's log handlers (stdout, log.txt).
_d2_logger = logging.getLogger("detectron2.solo_d2.trainer")


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


def _check_and_write_metrics(loss_dict, data_time: float, cur_iter: int, prefix: str = "") -> None:
    """``SimpleTrainer.write_metrics`` that all-gathers the losses (instead of gathering them on
    rank 0) so that every rank sees a non-finite loss and raises, naming the term and the rank."""
    metrics_dict = {k: v.detach().cpu().item() for k, v in loss_dict.items()}
    metrics_dict["data_time"] = data_time
    storage = get_event_storage()
    storage.put_scalar("rank_data_time", data_time, cur_iter=cur_iter)
    all_metrics = comm.all_gather(metrics_dict)
    bad = [
        (rank, k, v)
        for rank, m in enumerate(all_metrics)
        for k, v in m.items()
        if k != "data_time" and not math.isfinite(v)
    ]
    if bad:
        terms = ", ".join(
            f"{k} = {v}" + (f" (rank {rank})" if len(all_metrics) > 1 else "") for rank, k, v in bad
        )
        losses = {k: v for k, v in metrics_dict.items() if k != "data_time"}
        raise FloatingPointError(
            f"Loss became infinite or NaN at iteration {cur_iter} (iteration={cur_iter}): {terms}. "
            f"All losses on this rank: {losses}. Training stopped before the optimizer step, so "
            f"the last checkpoint in OUTPUT_DIR is intact; lower SOLVER.BASE_LR, enable gradient "
            f"clipping or check the data, then continue with --resume."
        )
    if comm.is_main_process():
        data_time = np.max([x.pop("data_time") for x in all_metrics])
        storage.put_scalar("data_time", data_time, cur_iter=cur_iter)
        metrics_dict = {k: np.mean([x[k] for x in all_metrics]) for k in all_metrics[0].keys()}
        storage.put_scalar("{}total_loss".format(prefix), sum(metrics_dict.values()), cur_iter=cur_iter)
        if len(metrics_dict) > 1:
            storage.put_scalars(cur_iter=cur_iter, **metrics_dict)


class _FiniteLossMixin:
    def _write_metrics(self, loss_dict, data_time, prefix="", iter=None):
        iter = self.iter if iter is None else iter
        if (iter + 1) % self.gather_metric_period == 0:
            try:
                _check_and_write_metrics(loss_dict, data_time, iter, prefix)
            except FloatingPointError:
                raise
            except Exception:
                _d2_logger.exception("Exception in writing metrics: ")
                raise


class CheckedSimpleTrainer(_FiniteLossMixin, SimpleTrainer):
    """``SimpleTrainer`` that stops on a non-finite loss on every rank."""


class CheckedAMPTrainer(_FiniteLossMixin, AMPTrainer):
    """``AMPTrainer`` (CUDA autocast, gradient scaler) that stops on a non-finite loss on every
    rank."""


class CheckedCPUAutocastTrainer(_FiniteLossMixin, SimpleTrainer):
    """``SimpleTrainer`` whose forward pass (model and losses) runs under CPU autocast in
    ``precision`` (bfloat16), for ``SOLVER.AMP.ENABLED`` on CPU, where Detectron2's
    ``AMPTrainer`` requires CUDA. Parameters, gradients and the optimizer stay float32; bfloat16
    has float32's exponent range, so gradients need no scaler. Stops on a non-finite loss on every
    rank."""

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


def amp_precision(cfg) -> torch.dtype:
    """The autocast dtype of ``SOLVER.AMP.PRECISION`` for ``MODEL.DEVICE`` ("" = the device's
    default: float16 on CUDA, bfloat16 on CPU)."""
    cuda = torch.device(cfg.MODEL.DEVICE).type == "cuda"
    name = cfg.SOLVER.AMP.PRECISION or ("float16" if cuda else "bfloat16")
    dtypes = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise ValueError(
            f"SOLVER.AMP.PRECISION = {name!r}: expected 'float16', 'bfloat16' or '' (the device's)"
        )
    if not cuda and name == "float16":
        raise ValueError(
            f"SOLVER.AMP.PRECISION = 'float16' with MODEL.DEVICE = {cfg.MODEL.DEVICE!r}: mixed "
            "precision on CPU runs in 'bfloat16' (float16 needs a gradient scaler, and CPUs "
            "compute it slowly)"
        )
    return dtypes[name]


def build_train_loop(cfg, model, data_loader, optimizer) -> TrainerBase:
    """The inner training loop for ``SOLVER.AMP``: float32 (``CheckedSimpleTrainer``), CUDA
    autocast with a gradient scaler (``CheckedAMPTrainer``) or CPU autocast
    (``CheckedCPUAutocastTrainer``)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return CheckedSimpleTrainer(model, data_loader, optimizer)
    precision = amp_precision(cfg)
    if torch.device(cfg.MODEL.DEVICE).type == "cuda":
        return CheckedAMPTrainer(model, data_loader, optimizer, precision=precision)
    return CheckedCPUAutocastTrainer(model, data_loader, optimizer, precision=precision)


class DataOrderHook(HookBase):
    """Saves the training sampler's seed and the number of images consumed so far in every
    checkpoint (trainer state ``hooks/DataOrderHook``) and, on resume, makes the sampler continue
    its stream at that position. Registered first, so its ``after_step`` runs before the
    checkpointer's.

    Exact when the loader yields the sampler's stream in order: always with
    ``DATALOADER.ASPECT_RATIO_GROUPING False`` or images of one orientation; with grouping and
    mixed portrait / landscape images, the grouping buffers reorder the stream by a few images, so
    the batches right after a resume may differ slightly from an uninterrupted run's. Any number
    of data-loader workers and of processes (before and after the resume) is fine.
    """

    def __init__(self, sampler: ResumableTrainingSampler, images_per_batch: int):
        self.sampler = sampler
        self.images_per_batch = int(images_per_batch)
        self.consumed = 0
        self._restored = False

    def before_train(self):
        if not self._restored:
            # No saved position (fresh run, or a checkpoint written without this hook): derive it.
            self.consumed = self.trainer.start_iter * self.images_per_batch
            if self.trainer.start_iter > 0:
                _d2_logger.warning(
                    "The checkpoint has no saved data order: the sampler continues at "
                    f"{self.consumed} images = iteration {self.trainer.start_iter} x "
                    f"IMS_PER_BATCH {self.images_per_batch}, with seed {self.sampler.seed}"
                )
        self.sampler.set_start(self.consumed)
        if self.consumed:
            _d2_logger.info(
                f"Data order: continuing the training sampler stream at image {self.consumed}"
            )

    def after_step(self):
        self.consumed += self.images_per_batch

    def state_dict(self):
        return {"seed": self.sampler.seed, "consumed": self.consumed, "dataset_size": self.sampler._size}

    def load_state_dict(self, state_dict):
        if state_dict.get("dataset_size") != self.sampler._size:
            _d2_logger.warning(
                f"The training set has {self.sampler._size} images but had "
                f"{state_dict.get('dataset_size')} when the checkpoint was written: the data order "
                "cannot continue exactly"
            )
        self.consumed = int(state_dict["consumed"])
        self.sampler.set_start(self.consumed, seed=state_dict["seed"])
        self._restored = True


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
        # The resumable sampler, when build_train_loader made one (SAMPLER_TRAIN TrainingSampler).
        self._train_sampler = getattr(data_loader, "solo_resumable_sampler", None)
        model = create_ddp_model(model, broadcast_buffers=False)
        self._trainer = build_train_loop(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # strict_heads=False: fine-tuning may re-initialise head parameters (logged as a warning).
        self.checkpointer = SafeDetectionCheckpointer(
            model, cfg.OUTPUT_DIR, strict_heads=False, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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
            _d2_logger.warning(
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
        kwargs = _train_loader_from_config(cfg, mapper=FileNamingDatasetMapper(cfg, True))
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        sampler = None
        if type(kwargs["sampler"]) is TrainingSampler:
            seed = int(cfg.SEED) if cfg.SEED >= 0 else comm.shared_random_seed()
            sampler = kwargs["sampler"] = ResumableTrainingSampler(len(kwargs["dataset"]), seed=seed)
        loader = build_detection_train_loader(**kwargs)
        if sampler is not None:
            loader.solo_resumable_sampler = sampler
        return loader

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=FileNamingDatasetMapper(cfg, False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators(
            [COCOEvaluator(dataset_name, tasks=("bbox", "segm"), output_dir=output_folder)]
        )


def setup_cfg(args, extra_opts=()):
    """Build the frozen cfg of a ``train_net.py`` run: Detectron2 defaults + solo_d2's keys +
    ``--config-file`` + ``extra_opts`` (e.g. the custom datasets' options) + ``args.opts``;
    falls back to the CPU (with a warning) when CUDA is absent."""
    cfg = get_cfg()
    add_solo_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(list(extra_opts))
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("CUDA is not available: MODEL.DEVICE set to cpu")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    return cfg
