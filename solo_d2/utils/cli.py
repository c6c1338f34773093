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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

__all__ = ["DEBUG_ENV", "UserError", "ConfigError", "add_debug_flag", "known_error_message", "run_main",
           "IMAGE_EXTENSIONS", "plan_outputs"]

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


#: File extensions cv2.imwrite can write; an ``--output`` without one of them is a folder.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def plan_outputs(inputs: Sequence[str], output: str, ext: Optional[str] = None) -> List[Tuple[str, str]]:
    """``(input, output file)`` pairs for a demo that writes one drawing per input image.

    ``output`` is a folder when it is an existing folder, ends with a slash, has no image file
    extension (``IMAGE_EXTENSIONS``) or there are several inputs; a drawing is then named after
    its input (extension ``ext``, e.g. ``".png"``, or the input's own). Inputs of equal names from
    different folders get their parent folders in the name (``a/img.png``, ``b/img.png`` ->
    ``a_img.png``, ``b_img.png``), so that no two drawings share a path; an input given twice
    (overlapping patterns) is drawn once. Otherwise ``output`` is the one image file to write.

    Raises:
        UserError: an output file that is one of the inputs (it would be overwritten), or an
            ``output`` that exists and is not a folder where a folder is needed.
    """
    seen: Dict[str, str] = {}
    for p in inputs:
        seen.setdefault(os.path.realpath(p), p)
    inputs = list(seen.values())
    is_dir = (os.path.isdir(output) or len(inputs) > 1 or output.endswith(("/", os.sep))
              or not output.lower().endswith(IMAGE_EXTENSIONS))
    if not is_dir:
        pairs = [(inputs[0], output)] if inputs else []
    else:
        if os.path.exists(output) and not os.path.isdir(output):
            raise UserError(f"--output {output}: exists and is not a folder (there are "
                            f"{len(inputs)} inputs: give a folder)")

        def name(path: str, depth: int) -> str:
            stem, own_ext = os.path.splitext(os.path.basename(path))
            parents = os.path.dirname(os.path.abspath(path)).split(os.sep)[1:]
            parts = [d for d in parents[len(parents) - depth:]] if depth else []
            return "_".join(parts + [stem]) + (ext if ext is not None else own_ext)

        depth = {p: 0 for p in inputs}
        for _ in range(64):  # enough parent folders to tell every input apart
            names: Dict[str, List[str]] = {}
            for p in inputs:
                names.setdefault(name(p, depth[p]).lower(), []).append(p)
            clashes = [ps for ps in names.values() if len(ps) > 1]
            if not clashes:
                break
            for ps in clashes:
                for p in ps:
                    depth[p] += 1
        pairs = [(p, os.path.join(output, name(p, depth[p]))) for p in inputs]
    for _, out in pairs:
        for p in inputs:
            if _same_file(out, p):
                raise UserError(f"--output {output}: would write over the input {p}; give "
                                "another output file or folder")
    return pairs
