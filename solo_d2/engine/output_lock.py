"""One live run per ``OUTPUT_DIR``: a lock file holding the owner's pid and host.

Two training runs writing into one ``OUTPUT_DIR`` overwrite each other's ``log.txt``,
``metrics.json`` and ``model_final.pth``, and one may delete the other's temporary checkpoint as
stale. :class:`OutputDirLock` makes the second run fail at once with a message naming the folder,
the pid and the host of the run that holds it.

- The lock is the file ``OUTPUT_DIR/.solo_d2.lock``, created atomically (``O_CREAT | O_EXCL``) and
  holding ``{"pid", "host", "started", "command"}`` as json.
- A lock is *stale* only when its process is gone: same host and ``os.kill(pid, 0)`` says no such
  process (a lock of another host is never taken over: the owner cannot be checked from here;
  delete the file by hand if that run is over). A stale lock is taken over, with a warning.
- Only the main process (rank 0) takes it (:func:`output_dir_lock`); it is released when the
  context exits and, for a process that ends without leaving it, at interpreter exit (atexit). A
  process killed with SIGKILL leaves the file behind; the next run finds its pid gone and takes
  it over. (Should the dead run's pid have been reused by a new, unrelated process, the lock looks
  alive: the message names the pid, so check it and delete the lock file.)
- ``train_net.py --eval-only`` takes the same lock: it is allowed into the folder of a finished
  run (the usual Detectron2 workflow: it writes ``OUTPUT_DIR/inference/`` and appends to
  ``log.txt``), but not while a training run (or another evaluation) is live there, because
  ``default_setup`` rewrites ``OUTPUT_DIR/config.yaml`` and both would write the same
  ``inference/*/coco_instances_results.json``. Evaluate a checkpoint of a live run with another
  ``OUTPUT_DIR``.
"""
import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import time
from typing import Optional

from ..utils.cli import UserError
from ..utils.file_io import pid_alive

__all__ = ["OutputDirLock", "OutputDirBusyError", "output_dir_lock", "LOCK_NAME"]

logger = logging.getLogger("detectron2.solo_d2.output_lock")

LOCK_NAME = ".solo_d2.lock"


class OutputDirBusyError(UserError, RuntimeError):
    """Another live process holds the lock of the output folder."""


class OutputDirLock:
    """Lock of one output folder (module docs). ``acquire()`` / ``release()`` or ``with``."""

    def __init__(self, output_dir: str, what: str = "a training run"):
        self.output_dir = os.path.abspath(output_dir)
        self.path = os.path.join(self.output_dir, LOCK_NAME)
        self.what = what
        self._held = False

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # half-written or garbage: treated as stale below

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
            "what": self.what,
        }
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        return True

    def acquire(self) -> "OutputDirLock":
        """Take the lock or raise :class:`OutputDirBusyError` naming the folder and the owner."""
        os.makedirs(self.output_dir, exist_ok=True)
        for _ in range(3):  # retry after removing a stale lock (another process may race us)
            if self._try_create():
                self._held = True
                atexit.register(self.release)
                return self
            info = self._read()
            if info is None:
                continue  # removed meanwhile
            pid, host = info.get("pid"), info.get("host")
            here = socket.gethostname()
            if isinstance(pid, int) and host == here and pid == os.getpid():
                raise OutputDirBusyError(f"{self.output_dir}: this process already holds {self.path}")
            if isinstance(pid, int) and host and host != here:
                raise OutputDirBusyError(
                    f"OUTPUT_DIR {self.output_dir} is in use by {info.get('what', 'another run')} "
                    f"(pid {pid} on host {host}, started {info.get('started', '?')}; lock "
                    f"{self.path}). Use another OUTPUT_DIR, or delete the lock file if that run "
                    "is over."
                )
            if isinstance(pid, int) and pid_alive(pid):
                raise OutputDirBusyError(
                    f"OUTPUT_DIR {self.output_dir} is in use by {info.get('what', 'another run')} "
                    f"(pid {pid} on host {host}, started {info.get('started', '?')}: "
                    f"{info.get('command', '')!r}). Two runs in one folder overwrite each other's "
                    "checkpoints and logs: wait for it, stop it, or use another OUTPUT_DIR."
                )
            logger.warning(f"Taking over the stale lock {self.path} of pid {pid} (no longer "
                           "running)")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        raise OutputDirBusyError(f"{self.output_dir}: could not take the lock {self.path}")

    def release(self) -> None:
        """Remove the lock file if this object holds it (idempotent)."""
        if not self._held:
            return
        self._held = False
        info = self._read()
        if info and info.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        with contextlib.suppress(Exception):
            atexit.unregister(self.release)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@contextlib.contextmanager
def output_dir_lock(output_dir: str, what: str = "a training run"):
    """Hold :class:`OutputDirLock` of ``output_dir`` in the main process (rank 0); other ranks
    (and an empty ``output_dir``) hold nothing."""
    from detectron2.utils import comm

    if not output_dir or not comm.is_main_process():
        yield None
        return
    with OutputDirLock(output_dir, what) as lock:
        yield lock
