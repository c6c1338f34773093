"""Counting host-device synchronisations of a piece of code, on any device, CPU included.

On an accelerator every read of a tensor's values on the host waits for all queued kernels.
:class:`SyncCensus` counts the operations that do so, as they reach PyTorch's dispatcher:
``nonzero``, ``unique`` (its variants), ``_local_scalar_dense`` (``item``, ``int(t)``,
``bool(t)``), ``equal``, ``masked_select`` and copies to the host (a ``_to_copy`` to the CPU
device, or a ``copy_`` into a CPU tensor from a tensor elsewhere). On the CPU nothing actually
waits, but the same operations run, so the count is the one the accelerator would see
(``.tolist()`` reads without dispatching: solo_d2 reads through
:func:`solo_d2.modeling.layers.read_on_host`, an explicit copy, so that it is counted).

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports the syncs the driver sees; this
counter is its CPU-side counterpart (tools/benchmark.py ``syncs`` reports both).
"""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCensus"]

#: operations whose output size or value the host must read (under ``torch.inference_mode``
#: the dispatcher shows some before their decomposition: ``nonzero_numpy``, ``item``, ``to``)
_READS = {"nonzero", "nonzero_numpy", "unique", "_unique", "_unique2", "unique_dim",
          "unique_consecutive", "_local_scalar_dense", "item", "equal", "masked_select",
          "is_nonzero"}


def _device_of(x):
    return x.device if isinstance(x, torch.Tensor) else None


def _copies_to_host(name, args, kwargs) -> bool:
    """Whether a ``to`` / ``_to_copy`` call copies to the host: its target device is the CPU
    and its source is elsewhere, or the copy is explicit (``_to_copy`` naming the CPU, ``to``
    with ``copy=True``: :func:`~solo_d2.modeling.layers.read_on_host` on the CPU). A
    ``non_blocking`` copy does not wait."""
    if kwargs.get("non_blocking") or (len(args) > 3 and args[3] is True and name == "to"):
        return False
    target = kwargs.get("device")
    if target is None:
        for x in args[1:]:
            if isinstance(x, (torch.device, str)):
                target = x
                break
            if isinstance(x, torch.Tensor):  # to(other)
                target = x.device
                break
    if target is None or torch.device(target).type != "cpu":
        return False
    src = _device_of(args[0]) if args else None
    explicit = name == "_to_copy" or bool(kwargs.get("copy")) or (len(args) > 4 and args[4] is True)
    return (src is not None and src.type != "cpu") or explicit


class SyncCensus(TorchDispatchMode):
    """``with SyncCensus() as census: ...`` then ``census.total`` and ``census.counts`` (a
    ``Counter`` by operation name)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _READS:
            self.counts[name] += 1
        elif name in ("to", "_to_copy"):
            if _copies_to_host(name, args, kwargs):
                self.counts["copy_to_host"] += 1
        elif name == "copy_" and len(args) >= 2:
            dst, src = _device_of(args[0]), _device_of(args[1])
            if dst is not None and src is not None and dst.type == "cpu" and src.type != "cpu":
                self.counts["copy_to_host"] += 1
        return func(*args, **kwargs)
