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
- **checkpoints that do not fit the model are an error** (``strict_heads=True``, the default):
  SOLO head parameters (keys under ``head.``) missing from the checkpoint or of another shape (weights
  of the other head type, of another ``NUM_CLASSES``), a checkpoint with no key of the model at all
  (e.g. a Mask R-CNN checkpoint: only its backbone would load) and an empty ``MODEL.WEIGHTS`` (random
  weights) raise :class:`IncompatibleCheckpointError` naming the keys. That is what inference and
  evaluation need (``SOLOPredictor``, ``train_net.py --eval-only``, ``demo/demo.py``). Opt out with
  ``strict_heads=False``, ``$SOLO_D2_ALLOW_PARTIAL_WEIGHTS=1`` or ``--allow-partial-weights``
  (train_net.py, demo.py). Training (``Trainer.resume_or_load``: fine-tuning from another model)
  uses ``strict_heads=False``: the head parameters that keep their initial values are listed in one
  warning (re-initialising the category conv for another ``NUM_CLASSES`` is the point there).
- **clear file errors**: a directory, an empty file or a truncated file given as weights raise
  :class:`CheckpointFileError` naming the file and saying which of these it is.

"""
import os
import pickle
from typing import Any, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .conversion.core import load_numpy_pickle
from .utils.cli import UserError
from .utils.file_io import atomic_write

__all__ = [
    "SafeDetectionCheckpointer",
    "UnsafeCheckpointError",
    "UNSAFE_LOAD_ENV",
    "unsafe_load_allowed",
    "CheckpointFileError",
    "IncompatibleCheckpointError",
    "PARTIAL_WEIGHTS_ENV",
    "partial_weights_allowed",
    "check_checkpoint_file",
    "needs_unsafe_unpickling",
    "unreadable_checkpoint_error",
]

#: Environment variable that allows arbitrary unpickling when loading checkpoints ("1" = allow).
UNSAFE_LOAD_ENV = "SOLO_D2_UNSAFE_LOAD"


#: Environment variable that allows loading weights that do not fit the model's head ("1" = allow).
PARTIAL_WEIGHTS_ENV = "SOLO_D2_ALLOW_PARTIAL_WEIGHTS"


class UnsafeCheckpointError(UserError, RuntimeError):
    """A checkpoint needs arbitrary unpickling (which can execute code) and it was not allowed."""


class CheckpointFileError(UserError, ValueError):
    """A weights path that is not a checkpoint file: a directory, an empty or a truncated file."""


class IncompatibleCheckpointError(UserError, ValueError):
    """A checkpoint whose head parameters do not fit the model (missing or of another shape), or
    none of whose keys are the model's, loaded where that is not allowed (inference)."""


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def unsafe_load_allowed() -> bool:
    """Whether ``$SOLO_D2_UNSAFE_LOAD`` allows arbitrary unpickling (1 / true / yes)."""
    return _env_flag(UNSAFE_LOAD_ENV)


def partial_weights_allowed() -> bool:
    """Whether ``$SOLO_D2_ALLOW_PARTIAL_WEIGHTS`` allows head parameters that are not loaded
    (missing / other shape) or random weights where a checkpoint must fit (1 / true / yes)."""
    return _env_flag(PARTIAL_WEIGHTS_ENV)


def _list_keys(keys, limit: int = 12) -> str:
    keys = list(keys)
    text = ", ".join(keys[:limit])
    return text + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def check_checkpoint_file(path: str) -> str:
    """Raise :class:`CheckpointFileError` naming ``path`` unless it is a file that can hold a
    checkpoint; returns its kind, ``"zip"`` (``torch.save``'s format) or ``"pickle"`` (the legacy
    format, and Detectron2's ``.pkl``). Refused: a missing path, a folder, an empty file, a zip
    without its directory (a truncated download) and a file that is neither a zip nor a pickle
    (text, HTML...). A truncated pickle is only found when loading it
    (:func:`unreadable_checkpoint_error`)."""
    import zipfile

    if os.path.isdir(path):
        raise CheckpointFileError(f"{path}: a folder, not a checkpoint file")
    if not os.path.isfile(path):
        raise CheckpointFileError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointFileError(f"{path}: not a checkpoint: empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path):
                pass
        except zipfile.BadZipFile:
            raise CheckpointFileError(
                f"{path}: not a checkpoint: truncated ({size} bytes; the zip's directory, at its "
                "end, is missing): download or copy it again") from None
        return "zip"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:  # pickle protocol 2-5 opcode
        return "pickle"
    raise CheckpointFileError(
        f"{path}: not a checkpoint: not a zip or pickle file ({size} bytes starting with {head!r})")


def needs_unsafe_unpickling(e: BaseException) -> bool:
    """Whether ``torch.load(weights_only=True)`` failed with ``e`` because the file holds Python
    objects (a global the weights-only unpickler refuses), not because it is broken."""
    text = str(e)
    return isinstance(e, pickle.UnpicklingError) and (
        "Unsupported global" in text or "GLOBAL" in text or "is not an allowed global" in text)


def unreadable_checkpoint_error(path: str, e: BaseException) -> CheckpointFileError:
    """The error for a checkpoint file that :func:`check_checkpoint_file` accepted but
    ``torch.load`` cannot read (``e``): truncated or corrupt."""
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    lines = str(e).strip().splitlines()
    detail = lines[0][:200] if lines else type(e).__name__
    return CheckpointFileError(
        f"{path}: not a checkpoint: truncated or corrupt ({size} bytes; {type(e).__name__}: {detail})")


def _is_local(path: str) -> bool:
    return "://" not in path


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
        strict_heads: Optional[bool] = None,
        **checkpointables,
    ):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as ``DetectionCheckpointer``.
            allow_unsafe_load: allow checkpoints that need arbitrary unpickling. ``None`` (default)
                reads ``$SOLO_D2_UNSAFE_LOAD``.
            strict_heads: raise :class:`IncompatibleCheckpointError` when head parameters are not
                loaded, when no key of the checkpoint is the model's, or for an empty path (random
                weights); ``False``: warn and keep their initial values (fine-tuning). ``None``
                (default): strict unless ``$SOLO_D2_ALLOW_PARTIAL_WEIGHTS`` is set.
        """
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        if allow_unsafe_load is None:
            allow_unsafe_load = unsafe_load_allowed()
        self.allow_unsafe_load = bool(allow_unsafe_load)
        if strict_heads is None:
            strict_heads = not partial_weights_allowed()
        self.strict_heads = bool(strict_heads)

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
    def load(self, path: str, checkpointables=None):
        if not path:
            if self.strict_heads:
                raise IncompatibleCheckpointError(
                    "No weights given (MODEL.WEIGHTS is empty): the model would predict with "
                    "random weights. Set MODEL.WEIGHTS to a trained checkpoint, or opt out with "
                    f"strict_heads=False / {PARTIAL_WEIGHTS_ENV}=1 / --allow-partial-weights."
                )
            return super().load(path, checkpointables)
        if _is_local(path):
            if os.path.isdir(path):
                raise CheckpointFileError(
                    f"Weights {path!r} is a directory, not a checkpoint file (give the .pth file "
                    f"inside it, e.g. {os.path.join(path, 'model_final.pth')!r})"
                )
            if not os.path.exists(path):
                raise CheckpointFileError(f"Weights {path!r}: file not found")
        return super().load(path, checkpointables)

    def _torch_load(self, f):
        if isinstance(f, str) and os.path.isfile(f) and os.path.getsize(f) == 0:
            raise CheckpointFileError(f"Weights {f!r} is an empty file (0 bytes): not a checkpoint")
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except (EOFError, RuntimeError) as e:  # zip reader: "failed finding central directory" ...
            raise CheckpointFileError(
                f"Weights {f!r} cannot be read: the file is truncated or not a PyTorch checkpoint "
                f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else 'end of file'})"
            ) from e
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
        if _is_local(filename) and os.path.isfile(filename) and os.path.getsize(filename) == 0:
            raise CheckpointFileError(
                f"Weights {filename!r} is an empty file (0 bytes): not a checkpoint"
            )
        if filename.endswith(".pkl"):
            if not self.allow_unsafe_load:
                with self.path_manager.open(filename, "rb") as fh:
                    try:
                        data = load_numpy_pickle(fh)
                    except pickle.UnpicklingError as e:
                        raise UnsafeCheckpointError(_unsafe_message(filename, str(e))) from None
                    except EOFError as e:
                        raise CheckpointFileError(
                            f"Weights {filename!r} cannot be read: the file is truncated ({e})"
                        ) from e
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

    def _load_model(self, checkpoint):
        num_ckpt_keys = len(checkpoint.get("model", {}) or {})
        incompatible = super()._load_model(checkpoint)
        self._check_head_loaded(incompatible, num_ckpt_keys)
        return incompatible

    def _check_head_loaded(self, incompatible, num_ckpt_keys: int) -> None:
        """Raise (strict) or warn (fine-tuning) when head parameters were not loaded or no
        parameter of the model was loaded at all."""
        model_keys = set(self.model.state_dict().keys()) - {"pixel_mean", "pixel_std"}
        not_loaded = set(incompatible.missing_keys) | {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [k for k in incompatible.missing_keys if k.startswith("head.")]
        shapes = [(k, a, b) for k, a, b in incompatible.incorrect_shapes if k.startswith("head.")]
        problems = []
        if model_keys and not (model_keys - not_loaded):
            problems.append(
                f"none of its {num_ckpt_keys} keys is a parameter of this model (unexpected keys "
                f"e.g. {_list_keys(sorted(incompatible.unexpected_keys), 3)}); is it a "
                "checkpoint of another architecture?"
            )
        if missing:
            problems.append(f"head parameters missing from it: {_list_keys(missing)}")
        if shapes:
            problems.append(
                "head parameters of another shape: " + _list_keys(
                    f"{k} {tuple(a)} in the checkpoint vs {tuple(b)} in the model" for k, a, b in shapes
                )
            )
        if not problems:
            return
        if self.strict_heads:
            raise IncompatibleCheckpointError(
                "The checkpoint does not fit this model, which would predict with partly random "
                "weights: " + "; ".join(problems) + ". Check --config-file / MODEL.SOLO.HEAD_TYPE / "
                "MODEL.SOLO.NUM_CLASSES against the config the weights were trained with, or opt "
                f"out with strict_heads=False / {PARTIAL_WEIGHTS_ENV}=1 / --allow-partial-weights."
            )
        self.logger.warning(
            "Training from a checkpoint that does not fully fit the model (expected when starting "
            "from backbone-only weights or changing NUM_CLASSES / the head type): these "
            "parameters keep their initial values and are trained from scratch: "
            + "; ".join(problems)
        )

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
