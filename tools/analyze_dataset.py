#!/usr/bin/env python
"""Which training objects SOLO's grids lose, and grids that keep them.

    python tools/analyze_dataset.py --config-file CONFIG --json train.json [--image-root DIR]
    python tools/analyze_dataset.py --config-file CONFIG --dataset NAME --suggest --write-config my.yaml
    python train_net.py --config-file my.yaml ...

Runs the project's own grid assignment over the dataset's annotations as the training mapper
resizes them (every size in INPUT.MIN_SIZE_TRAIN), without reading images, and prints per level
and in total: objects assigned, objects lost by (1) a scale in no level's range, (2) cells taken
by later objects, (3) cells too large for the object (solo_d2/analysis/grid_coverage.py defines
each), positive cells per object; writes a histogram of the object scales with the levels'
ranges (``--output``/scales.png). ``--suggest`` prints grid numbers, scale ranges and (where it
helps) an input size that keep the objects, with the reason for each; ``--write-config FILE``
writes them as a ``_BASE_`` config of CONFIG for train_net.py, with the input sizes the analysis
used and the ``KEY VALUE`` options given here. The dataset is ``--json`` (a COCO
json, checked first by the same ``validate_coco_json`` as ``train_net.py --train-json``, with the
same errors; the images are not decoded, only their headers read) or ``--dataset`` (a registered
Detectron2 dataset, e.g. shapes_train); default: the config's DATASETS.TRAIN. A suggestion that
does not reduce the objects lost is not written: the tool says why and exits 1. Errors are one
line, exit status 2 (``--debug``: with the traceback).
"""
import sys
import time
from pathlib import Path

from _common import config_parser, load_cfg
from solo_d2.utils.cli import UserError, run_main


def load_dicts(args, cfg):
    from detectron2.data import DatasetCatalog
    from detectron2.data.datasets import load_coco_json

    from solo_d2.data.coco_json import validate_coco_json

    if args.json:
        root = args.image_root or str(Path(args.json).parent)
        # What train_net.py --train-json checks (CocoDatasetError naming each problem).
        validate_coco_json(args.json, root, check_images=args.check_images)
        return load_coco_json(args.json, root), args.json
    names = [args.dataset] if args.dataset else list(cfg.DATASETS.TRAIN)
    dicts = []
    for name in names:
        if name not in DatasetCatalog.list():
            raise UserError(f"--dataset {name}: not a registered dataset")
        dicts += DatasetCatalog.get(name)
    return dicts, ", ".join(names)


def main(argv=None):
    p = config_parser(__doc__)
    p.add_argument("--json", help="COCO json of the training set")
    p.add_argument("--image-root", help="its image folder (not read; default: the json's folder)")
    p.add_argument("--dataset", help="a registered dataset name (default: DATASETS.TRAIN)")
    p.add_argument("--suggest", action="store_true", help="suggest grids / ranges / input size")
    p.add_argument("--write-config", metavar="FILE", help="write the suggestion as a _BASE_ config")
    p.add_argument("--output", default="output/analyze_dataset", help="folder of the histogram PNG")
    p.add_argument("--check-images", choices=("exists", "header"), default="header",
                   help="how --json's images are checked: 'header' (default, as train_net.py: the "
                        "file's size is read) or 'exists' (faster)")
    args = p.parse_args(argv)
    if args.json and args.dataset:
        p.error("give --json or --dataset, not both")
    if args.write_config and not args.suggest:
        p.error("--write-config needs --suggest")
    import torch

    import solo_d2  # noqa: F401  (registers the shapes datasets)
    from solo_d2.analysis.grid_coverage import grid_coverage_from_cfg, object_geometry
    from solo_d2.analysis.grid_suggestion import suggest_grids

    torch.set_num_threads(args.threads)
    cfg = load_cfg(args.config_file, args.opts, device="cpu")
    dicts, what = load_dicts(args, cfg)
    t0 = time.perf_counter()
    geometry = object_geometry(dicts)
    cov = grid_coverage_from_cfg(cfg, geometry)
    took = time.perf_counter() - t0
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    print(f"dataset: {what}; config: {args.config_file}")
    print(cov.table())
    for w in cov.warnings():
        print("WARNING:", w)
    print(f"histogram: {cov.plot(str(out / 'scales.png'))}  (analysis took {took:.2f} s)")
    if args.suggest:
        t0 = time.perf_counter()
        sug = suggest_grids(cfg, geometry)
        print(f"\nSuggested (took {time.perf_counter() - t0:.2f} s):")
        for r in sug.reasons:
            print("  -", r)
        if not sug.improved:
            print("nothing suggested" + (f"; {args.write_config} not written" if args.write_config else ""),
                  file=sys.stderr)
            return 1
        print(sug.coverage.table())
        print(f"histogram: {sug.coverage.plot(str(out / 'scales_suggested.png'))}")
        print("as options:", " ".join(f"'{o}'" if " " in o else o for o in sug.opts))
        if args.write_config:
            Path(args.write_config).parent.mkdir(parents=True, exist_ok=True)
            Path(args.write_config).write_text(sug.yaml(args.config_file, args.write_config, args.opts))
            print(f"wrote {args.write_config}: python train_net.py --config-file {args.write_config} ...")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, prog="analyze_dataset.py"))
