#!/usr/bin/env python
"""Run a trained SOLO / Decoupled SOLO model on images, a video or a webcam and draw its
predictions with Detectron2's Visualizer (the Detectron2 ``demo/demo.py``, for solo_d2).

    python demo/demo.py --config-file configs/Shapes/DecoupledSOLO_R18_shapes.yaml \\
        --input img1.png 'more/*.jpg' --output out/ --opts MODEL.WEIGHTS output/demo/model_final.pth
    python demo/demo.py --config-file CONFIG --video-input in.mp4 --output out.mp4 --opts MODEL.WEIGHTS W
    python demo/demo.py --config-file CONFIG --webcam --opts MODEL.WEIGHTS W

Class names come from the metadata of ``cfg.DATASETS.TEST[0]``. Without ``--output`` the drawings
are shown in a window (press Esc to stop); that and ``--webcam`` need an OpenCV with GUI support
(docs/reliability.md, "Demo without a GUI"): solo_d2 installs the headless one, with which the
demo stops with one line saying so. Weights that do not fit the config's head (another head type,
another NUM_CLASSES, another architecture) or an empty MODEL.WEIGHTS are an error naming the keys
unless ``--allow-partial-weights`` is given.

An input is never written over: an ``--output`` that is (or, as a folder, would write over) one
of the inputs is refused. Drawings of inputs with equal names from different folders get their
parent folders in their names (``a/img.png`` -> ``OUT/a_img.png``). Errors are one line, exit
status 2 (``--debug``: with the traceback).
"""
import argparse
import glob
import os
import sys
import time

import cv2
import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from detectron2.utils.logger import setup_logger  # noqa: E402

import solo_d2  # noqa: E402,F401  (registers the SOLO meta-architecture and the shapes datasets)
from solo_d2.utils.cli import UserError, add_debug_flag, plan_outputs, run_main  # noqa: E402
from solo_d2.visualize import VisualizationDemo, read_image_bgr, setup_demo_cfg  # noqa: E402

WINDOW_NAME = "solo_d2"
#: The config ``make demo`` trains (tools/demo_run.py), whose weights are output/demo/model_final.pth.
DEFAULT_CONFIG = "configs/Shapes/DecoupledSOLO_R18_shapes.yaml"


#: How to install a GUI OpenCV, as docs/reliability.md ("Demo without a GUI") says (both packages
#: provide cv2: the headless one must go).
GUI_INSTALL = ("pip install -e '.[gui]', then pip uninstall -y opencv-python-headless && "
               "pip install --force-reinstall 'opencv-python<4.11'")


class NoGUIError(OSError):
    """The installed OpenCV cannot open windows (opencv-python-headless)."""


def opencv_has_gui() -> bool:
    """Whether this OpenCV build has a GUI backend (GTK, Qt, Win32, Cocoa...): the ``GUI:`` line of
    ``cv2.getBuildInformation()`` is ``NONE`` for the headless builds."""
    info = cv2.getBuildInformation()
    lines = info.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "GUI:":
            value = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return not value.upper().startswith("NONE")
        if line.strip().startswith("GUI:"):
            return "NONE" not in line.split(":", 1)[1].upper()
    return True  # unknown layout: let namedWindow decide


def check_gui(what: str) -> None:
    """Raise :class:`NoGUIError` (one line) when ``what`` needs a window that this OpenCV cannot open."""
    if opencv_has_gui():
        return
    raise NoGUIError(
        f"{what} shows the drawings in a window, but the installed OpenCV has no GUI support "
        "(opencv-python-headless, which solo_d2 installs). Use --output FILE_OR_FOLDER to write "
        f"them instead, or install a GUI OpenCV: {GUI_INSTALL}"
    )


def _open_window():
    try:
        cv2.namedWindow(WINDOW_NAME, cv2.WINDOW_NORMAL)
    except cv2.error as e:  # e.g. a GUI build without a display
        raise NoGUIError(f"cannot open a window ({str(e).strip().splitlines()[-1]}); "
                         "use --output to write the drawings to files") from e


def get_parser():
    parser = argparse.ArgumentParser(description="solo_d2 demo: draw SOLO predictions")
    parser.add_argument("--config-file", default=DEFAULT_CONFIG, metavar="FILE",
                        help=f"path to a config file (default: {DEFAULT_CONFIG}, the model of "
                             "`make demo`)")
    parser.add_argument("--webcam", action="store_true", help="take inputs from the webcam")
    parser.add_argument("--video-input", help="path to a video file")
    parser.add_argument("--input", nargs="+",
                        help="image files or glob patterns, e.g. 'images/*.jpg'")
    parser.add_argument("--output",
                        help="a file or a folder to save the drawings to (a folder when there "
                             "are several inputs); without it they are shown in a window")
    parser.add_argument("--confidence-threshold", type=float, default=0.5,
                        help="minimum score of the instances drawn (default 0.5)")
    parser.add_argument("--allow-partial-weights", action="store_true",
                        help="run even when MODEL.WEIGHTS does not fit the config's head or is "
                             "empty (random weights); default: an error naming the keys")
    add_debug_flag(parser)
    parser.add_argument("--opts", default=[], nargs=argparse.REMAINDER,
                        help="config options as KEY VALUE pairs, e.g. MODEL.WEIGHTS model.pth")
    return parser


def expand_inputs(patterns):
    """File paths from file names and glob patterns; raise naming a pattern that matches nothing."""
    paths = []
    for p in patterns:
        if glob.has_magic(p):
            matches = sorted(glob.glob(os.path.expanduser(p)))
            if not matches:
                raise FileNotFoundError(f"{p}: no file matches this pattern")
            paths.extend(matches)
        else:
            paths.append(p)
    return paths


def run_images(demo, paths, output, logger):
    pairs = plan_outputs(paths, output, ext=".png") if output else [(p, None) for p in paths]
    for path, out in tqdm.tqdm(pairs, disable=not output):
        image = read_image_bgr(path)  # raises naming the file
        start = time.time()
        predictions, vis_rgb = demo.run_on_image(image)
        instances = predictions["instances"]
        shown = int((instances.scores >= demo.confidence_threshold).sum())
        logger.info(f"{path}: {len(instances)} instances, {shown} drawn, "
                    f"{time.time() - start:.2f}s")
        vis_bgr = cv2.cvtColor(vis_rgb, cv2.COLOR_RGB2BGR)
        if output:
            os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
            if not cv2.imwrite(out, vis_bgr):
                raise OSError(f"{out}: cannot write the image")
        else:
            _open_window()
            cv2.imshow(WINDOW_NAME, vis_bgr)
            if cv2.waitKey(0) == 27:
                break  # esc to quit


def run_video(demo, source, output, name):
    video = cv2.VideoCapture(source)
    if not video.isOpened():
        raise OSError(f"{name}: cannot open this video")
    width = int(video.get(cv2.CAP_PROP_FRAME_WIDTH))
    height = int(video.get(cv2.CAP_PROP_FRAME_HEIGHT))
    fps = video.get(cv2.CAP_PROP_FPS) or 30.0
    frames = int(video.get(cv2.CAP_PROP_FRAME_COUNT))
    writer = None
    if output:
        if os.path.isdir(output) or output.endswith(("/", os.sep)):
            os.makedirs(output, exist_ok=True)
            stem = os.path.splitext(os.path.basename(str(name)))[0]
            output = os.path.join(output, stem + ".mp4")
        if os.path.exists(output) and os.path.samefile(output, source):
            raise UserError(f"--output {output}: would write over the input video {name}; give "
                            "another file")
        parent = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(parent):
            raise FileNotFoundError(
                f"{output}: cannot write the video: folder {os.path.dirname(output) or parent} "
                "does not exist (create it first, or give an existing folder)"
            )
        writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*"mp4v"), float(fps),
                                 (width, height), True)
        if not writer.isOpened():
            raise OSError(f"{output}: cannot write an mp4v video here (no write permission, or "
                          "this OpenCV build has no mp4v encoder)")
    try:
        for vis in tqdm.tqdm(demo.run_on_video(video), total=frames if frames > 0 else None):
            if writer is not None:
                writer.write(vis)
            else:
                _open_window()
                cv2.imshow(WINDOW_NAME, vis)
                if cv2.waitKey(1) == 27:
                    break  # esc to quit
    finally:
        video.release()
        if writer is not None:
            writer.release()
        else:
            try:
                cv2.destroyAllWindows()
            except cv2.error:
                pass


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="fvcore")
    logger = setup_logger()
    logger.info("Arguments: " + str(args))
    sources = sum(bool(x) for x in (args.input, args.webcam, args.video_input))
    if sources != 1:
        get_parser().error("give exactly one of --input, --video-input, --webcam")
    if args.webcam and args.output:
        get_parser().error("--output is not supported with --webcam")
    paths = expand_inputs(args.input) if args.input else []
    for p in paths:  # fail before building the model
        if os.path.isdir(p):
            raise UserError(f"--input {p}: a folder: use '{os.path.join(p, '*.png')}' (or *.jpg ...)")
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such image file")
    if paths and args.output:
        plan_outputs(paths, args.output, ext=".png")  # refuse to write over an input, up front
    if args.video_input and not os.path.isfile(args.video_input):
        raise FileNotFoundError(f"{args.video_input}: no such video file")
    if args.webcam:
        check_gui("--webcam")
    elif not args.output:
        check_gui("Without --output, the demo")

    config_file = args.config_file
    if config_file == DEFAULT_CONFIG and not os.path.isfile(config_file):  # run from another folder
        config_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", DEFAULT_CONFIG)
    cfg = setup_demo_cfg(config_file, args.opts, args.confidence_threshold)
    demo = VisualizationDemo(cfg, confidence_threshold=args.confidence_threshold,
                             allow_partial_weights=args.allow_partial_weights or None)
    if paths:
        run_images(demo, paths, args.output, logger)
    elif args.webcam:
        run_video(demo, 0, None, "webcam")
    else:
        run_video(demo, args.video_input, args.output, args.video_input)
    return 0


if __name__ == "__main__":
    # Errors naming a file, key or value (OSError, ValueError, solo_d2's errors): one line, exit 2.
    sys.exit(run_main(main, prog="demo.py", known=(ValueError,)))
