#!/usr/bin/env python
"""Generate one split of the synthetic shapes dataset (COCO format) on the command line.

    python tools/generate_shapes.py --output DIR --split NAME --num-images N --image-size H W --seed S
    # large images (tiled inference): many 10-40 px shapes and a few large ones crossing tiles
    python tools/generate_shapes.py --output DIR --split large --num-images 4 --image-size 2048 2048 \
        --min-objects 150 --max-objects 200 --min-size 10 --max-size 40 --num-large 8 \
        --large-size 100 400 --max-occlusion 0.3

Writes ``DIR/NAME/*.png`` and ``DIR/NAME.json`` (:func:`solo_d2.data.shapes.generate_shapes_dataset`)
and prints the json's path. Bad arguments exit with status 2 and a one-line message.
"""
import argparse

import _common  # noqa: F401  (puts the repository's solo_d2 first on sys.path)
from solo_d2.data.shapes import generate_shapes_dataset


def main(argv=None):
    """Returns 0; ``argv``: arguments without the program name (None reads ``sys.argv``)."""
    parser = argparse.ArgumentParser(
        prog="tools/generate_shapes.py",
        description="Generate one split of the synthetic shapes dataset (COCO format).")
    parser.add_argument("--output", required=True,
                        help="dataset folder; writes OUTPUT/SPLIT/*.png and OUTPUT/SPLIT.json")
    parser.add_argument("--split", default="train", help="split name (default: train)")
    parser.add_argument("--num-images", type=int, default=300, help="default: 300")
    parser.add_argument("--image-size", type=int, nargs=2, default=[256, 256],
                        metavar=("H", "W"), help="default: 256 256")
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument("--max-objects", type=int, default=6)
    parser.add_argument("--min-size", type=float, default=12.0)
    parser.add_argument("--max-size", type=float, default=200.0)
    parser.add_argument("--empty-prob", type=float, default=0.05)
    parser.add_argument("--max-occlusion", type=float, default=0.5,
                        help="at most this fraction of an object may be hidden by later objects "
                             "(default: 0.5; higher gives more overlapping objects)")
    parser.add_argument("--min-objects", type=int, default=1,
                        help="at least this many objects are tried per image (default 1)")
    parser.add_argument("--num-large", type=int, default=0,
                        help="that many more objects per image, of sizes in --large-size")
    parser.add_argument("--large-size", type=float, nargs=2, default=[96.0, 400.0],
                        metavar=("MIN", "MAX"), help="size range of --num-large (default 96 400)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    try:
        path = generate_shapes_dataset(
            args.output, args.split, args.num_images, image_size=tuple(args.image_size),
            seed=args.seed, progress=not args.no_progress, max_objects=args.max_objects,
            min_size=args.min_size, max_size=args.max_size, empty_prob=args.empty_prob,
            max_occlusion=args.max_occlusion, min_objects=args.min_objects,
            num_large=args.num_large, large_size=tuple(args.large_size))
    except ValueError as e:
        parser.error(str(e))  # exits with status 2 and a one-line message
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
