"""Crash-safe checkpoints and safe weight loading.

:class:`SafeDetectionCheckpointer` is Detectron2's ``DetectionCheckpointer`` with three changes:

- **atomic saves** (:func:`solo_d2.utils.file_io.atomic_write`): a checkpoint is written to a temp file in the same folder, flushed, fsynced and
  renamed over its final name (``os.replace``); the ``last_checkpoint`` tag is written the same
  way and only after the checkpoint file is complete. A process killed at any moment leaves either
  the previous state or the new one, never a truncated ``.pth`` or a tag naming a missing file (at
  worst an orphan ``.model_XXXXXXX.pth.tmp-PID`` file, which nothing reads and the next save of
  that name removes). A model with NaN/inf parameters is never saved (``FloatingPointError``).
- **safe loading**: ``.pth`` files are read with ``torch.load(..., weights_only=True)``, which only
  rebuilds tensors and plain containers. A file that needs arbitrary unpickling (it could run code)
  is refused with :class:`UnsafeCheckpointError` unless the caller opts in with
  ``allow_unsafe_load=True`` or the environment variable ``SOLO_D2_UNSAFE_LOAD=1`` (what
  ``train_net.py --unsafe-load`` sets). Detectron2 / Caffe2 model-zoo ``.pkl`` files (plain pickles
  of numpy arrays) are read with a restricted unpickler that only accepts numpy arrays, numpy
  dtypes/scalars and plain containers; anything else in a ``.pkl`` is refused the same way.
- **clear shape-mismatch report**: like Detectron2, a parameter whose shape differs from the model's
  is skipped with a ``Skip loading parameter '<key>' ...`` warning per key; a summary warning then
  lists all of them together.
"""
import os
import pickle
from typing import Any, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils.file_io import atomic_write

__all__ = [
    "SafeDetectionCheckpointer",
    "UnsafeCheckpointError",
    "UNSAFE_LOAD_ENV",
    "unsafe_load_allowed",
]

#: Environment variable that allows arbitrary unpickling when loading checkpoints ("1" = allow).
UNSAFE_LOAD_ENV = "SOLO_D2_UNSAFE_LOAD"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint needs arbitrary unpickling (which can execute code) and it was not allowed."""


def unsafe_load_allowed() -> bool:
    """Whether ``$SOLO_D2_UNSAFE_LOAD`` allows arbitrary unpickling (1 / true / yes)."""
    return os.environ.get(UNSAFE_LOAD_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _is_local(path: str) -> bool:
    return "://" not in path


# --------------------------------------------------------------------------------------------
# Restricted unpickler for Detectron2 / Caffe2 model-zoo .pkl files (dicts of numpy arrays).
_SAFE_PKL_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # Python 2 pickles of bytes, read with encoding="latin1"
    ("__builtin__", "set"),
    ("builtins", "set"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _SAFE_PKL_GLOBALS or (
            module in ("numpy", "numpy.dtypes") and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def _unpickling_reason(e: Exception) -> str:
    """The line of torch's weights_only error that names the refused global."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    for line in lines:
        if "Unsupported global" in line or "global" in line.lower():
            return line[:300]
    return lines[0][:300] if lines else type(e).__name__


def _unsafe_message(filename: str, reason: str) -> str:
    return (
        f"Refusing to load checkpoint {filename!r}: it needs arbitrary unpickling, which can execute "
        f"code ({reason}). Only a file you trust should be loaded that way: pass "
        f"allow_unsafe_load=True to the checkpointer, set {UNSAFE_LOAD_ENV}=1, or run train_net.py "
        f"with --unsafe-load. Better: convert it once to a plain state dict "
        f"(torch.save({{'model': model.state_dict()}}, path))."
    )


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and ``weights_only`` loading (module docs)."""

    def __init__(
        self,
        model,
        save_dir: str = "",
        *,
        save_to_disk: Optional[bool] = None,
        allow_unsafe_load: Optional[bool] = None,
        **checkpointables,
    ):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
            allow_unsafe_load: allow checkpoints that need arbitrary unpickling. ``None`` (default)
                reads ``$SOLO_D2_UNSAFE_LOAD``.
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if allow_unsafe_load is None:
            allow_unsafe_load = unsafe_load_allowed()
        self.allow_unsafe_load = bool(allow_unsafe_load)

    # ---------------------------------------------------------------- saving
    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        basename = "{}.pth".format(name)
        save_file = os.path.join(self.save_dir, basename)
        assert os.path.basename(save_file) == basename, basename
        for k, v in self.model.state_dict().items():
            if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                raise FloatingPointError(
                    f"Not saving checkpoint {save_file}: model parameter {k!r} has NaN/inf values "
                    f"(training diverged). The previous checkpoint is left as it is."
                )
        if not _is_local(save_file):
            return super().save(name, **kwargs)

        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        save_file = os.path.join(self.save_dir, "last_checkpoint")
        if not _is_local(save_file):
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write(save_file, lambda f: f.write(last_filename_basename), mode="w")

    # ---------------------------------------------------------------- loading
    def _torch_load(self, f):
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            reason = _unpickling_reason(e)
            if not self.allow_unsafe_load:
                raise UnsafeCheckpointError(_unsafe_message(f, reason)) from None
            self.logger.warning(
                f"Loading {f} with arbitrary unpickling (allowed by allow_unsafe_load / "
                f"{UNSAFE_LOAD_ENV}): {reason}"
            )
            return torch.load(f, map_location=torch.device("cpu"), weights_only=False)

    def _load_file(self, filename):
        if filename.endswith(".pkl"):
            if not self.allow_unsafe_load:
                with self.path_manager.open(filename, "rb") as fh:
                    try:
                        data = _NumpyOnlyUnpickler(fh, encoding="latin1").load()
                    except pickle.UnpicklingError as e:
                        raise UnsafeCheckpointError(_unsafe_message(filename, str(e))) from None
                return self._from_pkl_data(data)
            return super()._load_file(filename)
        if filename.endswith(".pyth"):
            data = self._torch_load(filename)
            if "model_state" not in data:
                raise ValueError(f"Cannot load .pyth file {filename}: pycls checkpoints have 'model_state'")
            state = {
                k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
            }
            return {"model": state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)  # .pth & co: DetectionCheckpointer -> self._torch_load

    def _from_pkl_data(self, data):
        # Same interpretation as DetectionCheckpointer._load_file for .pkl files.
        if not isinstance(data, dict):
            raise ValueError(f"A .pkl checkpoint must hold a dict, got {type(data).__name__}")
        if "model" in data and "__author__" in data:
            self.logger.info("Reading a file from '{}'".format(data["__author__"]))
            return data
        if "blobs" in data:
            data = data["blobs"]
        data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}

    def _log_incompatible_keys(self, incompatible) -> None:
        super()._log_incompatible_keys(incompatible)  # one "Skip loading parameter ..." per key
        if incompatible.incorrect_shapes:
            lines = "\n".join(
                f"  {k}: {tuple(s_ckpt)} in the checkpoint, {tuple(s_model)} in the model"
                for k, s_ckpt, s_model in incompatible.incorrect_shapes
            )
            self.logger.warning(
                f"{len(incompatible.incorrect_shapes)} parameter(s) were NOT loaded because their "
                f"shapes differ (they keep their initial values):\n{lines}"
            )
