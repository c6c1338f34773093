"""Crash-safe file writing: :func:`atomic_write`, used by checkpoints and the shapes generator."""
import os
from typing import Any, Callable

__all__ = ["atomic_write"]


def _fsync_dir(folder: str) -> None:
    """fsync a directory so that a rename in it is durable (best effort: not on every OS)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, write_fn: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` all at once: ``write_fn(f)`` writes a temp file in the same folder, which is
    flushed, fsynced and renamed over ``path``. On any error (or a kill) ``path`` is untouched; a
    temp file left by a killed process (``.<name>.tmp-<pid>``) is removed by the next write of
    ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = ".{}.tmp-".format(os.path.basename(path))
    for stale in os.listdir(folder):
        if stale.startswith(prefix):
            try:
                os.unlink(os.path.join(folder, stale))
            except OSError:
                pass
    tmp = os.path.join(folder, prefix + str(os.getpid()))
    try:
        with open(tmp, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)
