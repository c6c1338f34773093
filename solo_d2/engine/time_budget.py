"""A training schedule sized to this machine: ``SOLVER.TIME_BUDGET_MINUTES``.

Before training, :func:`fit_to_time_budget` times a few real training steps (the config's model,
optimizer, inner loop and data loader, data loading included) in each memory layout
(``MODEL.SOLO.CHANNELS_LAST``), keeps the faster layout and sets ``SOLVER.MAX_ITER`` to the
iterations that fit the budget (never more than the config's), scaling ``SOLVER.STEPS`` and
``SOLVER.WARMUP_ITERS`` by the same factor so the learning-rate schedule keeps its shape. The
choice is logged and written to ``OUTPUT_DIR/time_budget.json``; a later run in the same
``OUTPUT_DIR`` with the same budget and schedule (``--resume``) reuses it instead of probing again,
so a resumed run keeps its schedule.
"""
import json
import logging
import os
import statistics
import time
from contextlib import contextmanager
from typing import List

import torch
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from ..config import cpu_description
from .train_loop import build_train_loop

__all__ = ["measure_step_time", "time_steps", "fit_to_time_budget", "TIME_BUDGET_FILE"]

logger = logging.getLogger("detectron2.solo_d2.time_budget")

#: Where the fitted schedule is written, in OUTPUT_DIR.
TIME_BUDGET_FILE = "time_budget.json"
#: Steps timed per layout, after the warm-up steps (first batches, allocator, oneDNN kernels).
PROBE_STEPS = 8
PROBE_WARMUP = 3
#: Seconds per iteration are multiplied by this for the fit: a whole run's mean iteration (the
#: trainer's hooks, the data loader's slow batches) is 11-14% above the probe's median
#: (docs/benchmarks/demo.md).
MARGIN = 1.15


@contextmanager
def _quiet():
    """Silence the INFO logs of building a second model and loader (the real ones log them)."""
    loggers = [logging.getLogger(n) for n in ("detectron2", "fvcore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def measure_step_time(trainer_cls, cfg, steps: int = None, warmup: int = None) -> float:
    """Median seconds of one training iteration of ``cfg`` on this machine, data loading
    included: a fresh model, optimizer and train loader from ``trainer_cls``'s builders, the
    inner loop :func:`build_train_loop` picks, ``warmup`` untimed then ``steps`` timed
    iterations (default :data:`PROBE_WARMUP`, :data:`PROBE_STEPS`). Everything it builds is
    discarded."""
    steps = PROBE_STEPS if steps is None else steps
    warmup = PROBE_WARMUP if warmup is None else warmup
    if steps < 1 or warmup < 0:
        raise ValueError(f"measure_step_time: steps = {steps} (>= 1), warmup = {warmup} (>= 0)")
    with _quiet():
        model = trainer_cls.build_model(cfg)
        model.train()
        optimizer = trainer_cls.build_optimizer(cfg, model)
        loader = trainer_cls.build_train_loader(cfg)
        loop = build_train_loop(cfg, model, loader, optimizer)
        times = time_steps(loop, warmup + steps, cfg.MODEL.DEVICE)
        del loop, loader, optimizer, model
    return statistics.median(times[warmup:])


def time_steps(loop, count: int, device) -> List[float]:
    """Seconds of each of ``count`` iterations of a train loop (``loop.run_step()``, its
    ``iter`` set to the iteration's index, in a fresh ``EventStorage``), synchronised on CUDA
    (``device``: the model's)."""
    cuda = torch.device(device).type == "cuda"
    times = []
    with EventStorage(0) as storage:
        for i in range(count):
            loop.iter = storage.iter = i
            start = time.perf_counter()
            loop.run_step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times


def _scaled(cfg, max_iter: int, channels_last: bool):
    """``cfg`` with MAX_ITER ``max_iter``, STEPS and WARMUP_ITERS scaled by the same factor and
    ``MODEL.SOLO.CHANNELS_LAST`` set; frozen."""
    factor = max_iter / cfg.SOLVER.MAX_ITER
    out = cfg.clone()
    out.defrost()
    out.SOLVER.MAX_ITER = max_iter
    out.SOLVER.STEPS = tuple(int(round(s * factor)) for s in cfg.SOLVER.STEPS)
    out.SOLVER.WARMUP_ITERS = int(round(cfg.SOLVER.WARMUP_ITERS * factor))
    out.MODEL.SOLO.CHANNELS_LAST = channels_last
    out.freeze()
    return out


def fit_to_time_budget(trainer_cls, cfg, measure=measure_step_time):
    """``cfg`` with its schedule fitted to ``SOLVER.TIME_BUDGET_MINUTES`` (module docs); ``cfg``
    itself when the budget is 0. ``measure(trainer_cls, cfg)`` gives seconds per iteration.

    Raises:
        ValueError: a negative budget, or one too small for a single iteration.
    """
    minutes = cfg.SOLVER.TIME_BUDGET_MINUTES
    if minutes == 0:
        return cfg
    if not isinstance(minutes, int) or minutes < 0:
        raise ValueError(f"SOLVER.TIME_BUDGET_MINUTES = {minutes!r}: must be a whole number of minutes >= 0 (0 = off)")
    requested = {
        "minutes": minutes,
        "config_max_iter": int(cfg.SOLVER.MAX_ITER),
        "config_steps": [int(s) for s in cfg.SOLVER.STEPS],
        "config_warmup_iters": int(cfg.SOLVER.WARMUP_ITERS),
    }
    path = os.path.join(cfg.OUTPUT_DIR, TIME_BUDGET_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if {k: saved.get(k) for k in requested} == requested:
            logger.info(
                f"SOLVER.TIME_BUDGET_MINUTES = {minutes:g}: reusing the schedule fitted earlier "
                f"in {path} (MAX_ITER {saved['max_iter']}, channels-last "
                f"{saved['channels_last']}); delete that file to probe again"
            )
            return _scaled(cfg, saved["max_iter"], saved["channels_last"])

    seconds = {}
    for channels_last in (bool(cfg.MODEL.SOLO.CHANNELS_LAST), not cfg.MODEL.SOLO.CHANNELS_LAST):
        probe = cfg.clone()
        probe.defrost()
        probe.MODEL.SOLO.CHANNELS_LAST = channels_last
        # The slowest rank sets the pace of synchronous data-parallel training.
        seconds[channels_last] = max(comm.all_gather(float(measure(trainer_cls, probe))))
    channels_last = min(seconds, key=seconds.get)
    per_iter = seconds[channels_last] * MARGIN
    max_iter = min(int(minutes * 60 / per_iter), cfg.SOLVER.MAX_ITER)
    if max_iter < 1:
        raise ValueError(
            f"SOLVER.TIME_BUDGET_MINUTES = {minutes:g}: one iteration takes "
            f"{seconds[channels_last]:.2f} s here, longer than the budget"
        )
    fitted = _scaled(cfg, max_iter, channels_last)
    layouts = ", ".join(
        f"{'channels-last' if cl else 'standard'} {s:.3f}" for cl, s in sorted(seconds.items())
    )
    device = cfg.MODEL.DEVICE if torch.device(cfg.MODEL.DEVICE).type != "cpu" else cpu_description()
    logger.info(
        f"SOLVER.TIME_BUDGET_MINUTES = {minutes:g} on {device}: s/iteration {layouts} -> "
        f"{'channels-last' if channels_last else 'standard'} layout; MAX_ITER "
        f"{cfg.SOLVER.MAX_ITER} -> {max_iter}, STEPS {tuple(cfg.SOLVER.STEPS)} -> "
        f"{tuple(fitted.SOLVER.STEPS)}, WARMUP_ITERS {cfg.SOLVER.WARMUP_ITERS} -> "
        f"{fitted.SOLVER.WARMUP_ITERS}"
    )
    if comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(path, "w") as f:
            json.dump(
                {
                    **requested,
                    "max_iter": max_iter,
                    "steps": list(fitted.SOLVER.STEPS),
                    "warmup_iters": fitted.SOLVER.WARMUP_ITERS,
                    "channels_last": channels_last,
                    "seconds_per_iteration": {
                        ("channels_last" if cl else "standard"): s for cl, s in seconds.items()
                    },
                    "machine": device,
                },
                f,
                indent=2,
            )
    return fitted
