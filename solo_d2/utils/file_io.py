"""Crash-safe file writing: :func:`atomic_write`, used by checkpoints and the shapes generator;
:func:`pid_alive`, shared with the output-folder lock."""
import errno
import os
from typing import Any, Callable

__all__ = ["atomic_write", "pid_alive"]


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return True


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
    temp file left by a killed process (``.<name>.tmp-<pid>``, that pid no longer running) is
    removed by the next write of ``path``. Processes writing the same path at the same time (two
    ranks generating one dataset) each rename their own complete file; the last one wins."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = ".{}.tmp-".format(os.path.basename(path))
    for stale in os.listdir(folder):
        owner = stale[len(prefix):]
        if stale.startswith(prefix) and not (owner.isdigit() and pid_alive(int(owner))):
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
