"""How the command-line tools report a known error: one line on stderr, exit status 2.

    from solo_d2.utils.cli import UserError, add_debug_flag, run_main

    def main(argv=None):
        parser = argparse.ArgumentParser()
        add_debug_flag(parser)
        ...
        raise UserError("--input imgs: a folder: use 'imgs/*.png'")

    if __name__ == "__main__":
        sys.exit(run_main(main, prog="demo.py"))

A *known* error is a problem with what the user gave (a file, a config key, an option), whose
message already names it: :class:`UserError` and its subclasses (solo_d2's dataset, checkpoint
and config errors), ``OSError`` (a missing / unwritable file or folder), yacs' config errors
(``Non-existent config key``, an odd-length option list, a type mismatch, a missing config file)
and the exception types a tool adds with ``known=``. :func:`run_main` prints such an error as
``PROG: error: MESSAGE`` (the message may list several problems, one per line) and returns 2,
the status ``argparse`` uses for a bad command line. Any other exception is a bug and keeps its
traceback. ``--debug`` on the command line or ``SOLO_D2_DEBUG=1`` in the environment shows the
traceback of known errors too.

This module uses the standard library only (``demo/onnx_demo.py`` loads it without torch).
"""
import os
import sys
from typing import Callable, Optional, Sequence, Tuple, Type

__all__ = ["DEBUG_ENV", "UserError", "ConfigError", "add_debug_flag", "known_error_message", "run_main"]

#: Environment variable that shows the traceback of known errors (1 / true / yes / on).
DEBUG_ENV = "SOLO_D2_DEBUG"
#: Exit status of a known error (argparse's for a bad command line).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input (file, option, config key, data) whose message names it;
    command-line tools print it as one line (:func:`run_main`)."""


class ConfigError(UserError, ValueError):
    """A config file or ``KEY VALUE`` option that cannot be merged (unknown key, wrong type,
    odd-length list, missing file); the message names the file or the options."""


def add_debug_flag(parser) -> None:
    """Add ``--debug`` (show the traceback of known errors) to an ``argparse`` parser."""
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of errors (also: {DEBUG_ENV}=1)")


def _debug(argv: Optional[Sequence[str]]) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in list(args)


def _yacs_message(e: BaseException) -> Optional[str]:
    """The message of one of yacs' / Detectron2's config errors, or None."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    if isinstance(e, KeyError) and "Non-existent config key" in text:
        return text
    if isinstance(e, AssertionError) and any(
            t in text for t in ("odd length", "Non-existent key", "Config file", "does not exist")):
        return text
    if isinstance(e, ValueError) and "Type mismatch" in text and "config key" in text:
        return text
    return None


def known_error_message(e: BaseException, known: Tuple[Type[BaseException], ...] = ()) -> Optional[str]:
    """The message to print for a known error ``e`` (module docs), or None for any other."""
    if isinstance(e, (UserError, OSError) + tuple(known)):
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        return msg.strip() or type(e).__name__
    return _yacs_message(e)


def run_main(main: Callable[..., Optional[int]], argv: Optional[Sequence[str]] = None,
             prog: Optional[str] = None, known: Tuple[Type[BaseException], ...] = ()) -> int:
    """``main(argv)`` (``main()`` when ``argv`` is None); its return value (None: 0) as the exit
    status, or 2 after printing a known error as ``PROG: error: MESSAGE`` (module docs)."""
    prog = prog or os.path.basename(sys.argv[0] or "solo_d2")
    try:
        status = main() if argv is None else main(argv)
    except (Exception, SystemExit) as e:
        if isinstance(e, SystemExit) or _debug(argv):
            raise
        msg = known_error_message(e, known)
        if msg is None:
            raise
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0 if status is None else int(status) if isinstance(status, int) else 0
