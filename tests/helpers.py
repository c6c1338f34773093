"""Helpers of the tests (imported as ``from helpers import ...``; fixtures live in conftest.py):
the test cfg, tiny synthetic datasets, and running ``train_net.py`` (or the crash-test driver, a
copy of its ``main``) in a subprocess."""
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_json
from detectron2.structures import BitMasks, BoxMode, Instances

from solo_d2 import get_solo_cfg

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = str(REPO / "configs" / "tests" / "SOLO_tiny.yaml")
CLASSES = ["rect", "ellipse", "triangle", "cross"]


def solo_test_cfg(config_file=TINY_CONFIG, opts=()):
    """:func:`solo_d2.get_solo_cfg` of ``config_file`` (default: the tiny test config) and
    ``opts``, on CPU, unfrozen."""
    cfg = get_solo_cfg(config_file, opts)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def tiny_cfg(head_type="SOLOHead", **overrides):
    """The tiny test config on CPU; ``overrides`` are flat KEY=VALUE pairs ("MODEL.SOLO.X")."""
    cfg = solo_test_cfg(opts=["MODEL.SOLO.HEAD_TYPE", head_type])
    for k, v in overrides.items():
        cfg.merge_from_list([k, v])
    return cfg


def amp_trainer(dataset, output_dir, steps, precision=""):
    """A Trainer of the tiny Decoupled SOLO config with SOLVER.AMP on (``precision``: its
    SOLVER.AMP.PRECISION), 2 images a step for ``steps`` steps, and the list that will receive
    the dtype of every output of the first mask-tower conv (5 levels a step) once it trains."""
    from solo_d2.engine import Trainer

    cfg = tiny_cfg("DecoupledSOLOHead", **{"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.PRECISION": precision,
                                           "SOLVER.IMS_PER_BATCH": 2, "SOLVER.MAX_ITER": steps})
    cfg.DATASETS.TRAIN = (dataset,)
    cfg.OUTPUT_DIR = str(output_dir)
    trainer = Trainer(cfg)
    dtypes = []
    trainer.model.head.mask_towers()[0][0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    return trainer, dtypes


#: the environment entries that pin a subprocess to the CPU: no CUDA device visible, so configs
#: saying ``MODEL.DEVICE cuda`` fall back to the CPU and distributed runs use gloo, on a CUDA
#: machine as on a CPU one (only tests/test_cuda.py uses the GPU)
CPU_ONLY = {"CUDA_VISIBLE_DEVICES": ""}


def cpu_env(**extra):
    """``os.environ`` with :data:`CPU_ONLY` and ``extra`` (which may override it)."""
    return {**os.environ, **CPU_ONLY, **extra}


def subprocess_env(tmp_path, threads=2, **extra):
    """The environment of a training subprocess: this checkout's solo_d2 first on PYTHONPATH,
    ``threads`` OpenMP threads, the shapes datasets under ``tmp_path / "datasets"``, on the CPU
    (:data:`CPU_ONLY`)."""
    env = cpu_env(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), **extra)
    env["SOLO_D2_DATASETS"] = str(Path(tmp_path) / "datasets")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def train_net_cmd(*args, config_file=TINY_CONFIG, script=None):
    """``python train_net.py --config-file CONFIG ARGS...`` (or ``script`` instead of train_net.py)."""
    return [sys.executable, str(script or REPO / "train_net.py"), "--config-file", config_file, *args]


def start(cmd, env, cwd):
    """Start ``cmd`` with stdout and stderr together in one text pipe."""
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, timeout=300):
    """(exit status, output) of a process from :func:`start`; kills it on timeout."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, out


def load_script(path, name=None):
    """Import a script of the checkout (``"tools/demo_run.py"``, ``"demo/demo.py"``) as a module,
    with its folder on ``sys.path`` while it loads (as when it runs: tools import ``_common``)."""
    import importlib.util

    path = REPO / path
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        spec = importlib.util.spec_from_file_location(name or path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def run_script(script, *args, cwd=REPO, env=None, timeout=300):
    """Run ``python SCRIPT ARGS...`` on the CPU (``env``: extra environment variables); returns
    the ``CompletedProcess`` (``stdout`` and ``stderr`` apart)."""
    return subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=cpu_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def run_train_net(args, cwd, timeout=300, threads=2):
    """Run ``train_net.py`` with the tiny config and ``args`` in ``cwd``; returns the
    ``CompletedProcess`` (``stdout`` and ``stderr`` apart)."""
    return subprocess.run(train_net_cmd(*args), cwd=cwd, env=subprocess_env(cwd, threads),
                          capture_output=True, text=True, timeout=timeout)


def draw_shape(kind: int, h: int, w: int, box) -> np.ndarray:
    """A bool (h, w) mask of shape ``kind`` (0..3) filling ``box`` = (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    m = np.zeros((h, w), np.uint8)
    if kind == 0:
        m[y0:y1, x0:x1] = 1
    elif kind == 1:
        cv2.ellipse(m, ((x0 + x1) // 2, (y0 + y1) // 2), ((x1 - x0) // 2, (y1 - y0) // 2), 0, 0, 360, 1, -1)
    elif kind == 2:
        pts = np.array([[x0, y1 - 1], [x1 - 1, y1 - 1], [(x0 + x1) // 2, y0]], np.int32)
        cv2.fillPoly(m, [pts], 1)
    else:
        tw, th = max((x1 - x0) // 3, 1), max((y1 - y0) // 3, 1)
        m[y0 + th : y1 - th, x0:x1] = 1
        m[y0:y1, x0 + tw : x1 - tw] = 1
    return m.astype(bool)


def make_image(rng: np.random.Generator, h=128, w=128, max_objects=3, min_size=16, max_size=64):
    """(image uint8 HxWx3 BGR, [(class, visible mask bool HxW)]): non-empty, later objects occlude."""
    img = (rng.normal(110, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    objs = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        size = int(rng.integers(min_size, max_size + 1))
        x0 = int(rng.integers(0, w - size + 1))
        y0 = int(rng.integers(0, h - size + 1))
        kind = int(rng.integers(0, 4))
        m = draw_shape(kind, h, w, (x0, y0, x0 + size, y0 + size))
        colour = rng.integers(0, 256, 3)
        img[m] = colour
        objs = [(c, om & ~m) for c, om in objs]
        objs.append((kind, m))
    return img, [(c, m) for c, m in objs if m.sum() >= 10]


def write_dataset(root: Path, name: str, num_images: int, seed: int, **kw):
    """Write PNGs + Detectron2 dicts (RLE masks) and register them as ``name``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    dicts = []
    for i in range(num_images):
        img, objs = make_image(rng, **kw)
        path = str(root / f"{name}_{i}.png")
        cv2.imwrite(path, img)
        anns = []
        for c, m in objs:
            rle = mask_util.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            anns.append(
                {
                    "category_id": c,
                    "segmentation": rle,
                    "bbox": mask_util.toBbox(rle).tolist(),
                    "bbox_mode": BoxMode.XYWH_ABS,
                    "iscrowd": 0,
                }
            )
        dicts.append(
            {"file_name": path, "image_id": i, "height": img.shape[0], "width": img.shape[1], "annotations": anns}
        )
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dicts)
    MetadataCatalog.get(name).set(thing_classes=list(CLASSES), evaluator_type="coco")
    # The COCO json the evaluator scores against, beside the images. (Without it, the evaluator
    # writes one into its output folder and keeps that path in the metadata: a later test would
    # read a file of an earlier test's folder, which pytest removes when that test passes.)
    json_file = str(root / f"{name}_coco_format.json")
    convert_to_coco_json(name, json_file, allow_cached=False)
    MetadataCatalog.get(name).set(json_file=json_file)
    return dicts


def instances(h, w, boxes_and_classes, image_size=None):
    """GT Instances of size ``image_size or (h, w)`` with rectangular masks for (x0, y0, x1, y1, cls)."""
    inst = Instances(image_size or (h, w))
    m = torch.zeros(len(boxes_and_classes), h, w, dtype=torch.bool)
    for i, (x0, y0, x1, y1, _) in enumerate(boxes_and_classes):
        m[i, y0:y1, x0:x1] = True
    inst.gt_masks = BitMasks(m)
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    inst.gt_classes = torch.tensor([c for *_, c in boxes_and_classes], dtype=torch.int64)
    return inst


# A copy of train_net.py's main() that registers a test dataset (from $SOLO_TEST_DATASET) in every
# process, records the losses of every iteration (rank 0) and can SIGKILL itself after iteration
# --kill-after-iter (after that iteration's checkpoint is written) or half-way through writing the
# checkpoint file whose name contains --kill-during-save.
DRIVER = r'''
import io, json, os, signal, sys
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import HookBase, default_argument_parser, launch
from detectron2.structures import BoxMode
from detectron2.utils import comm

import solo_d2  # noqa: F401
from solo_d2.engine import Trainer, setup_cfg


def register():
    spec = json.loads(os.environ["SOLO_TEST_DATASET"])
    if spec["name"] in DatasetCatalog.list():
        return
    with open(spec["json"]) as f:
        dicts = json.load(f)
    for d in dicts:
        for a in d["annotations"]:
            a["bbox_mode"] = BoxMode(a["bbox_mode"])
    DatasetCatalog.register(spec["name"], lambda: dicts)
    MetadataCatalog.get(spec["name"]).set(thing_classes=spec["classes"])


class KillAfterIter(HookBase):
    def __init__(self, it):
        self.it = it

    def after_step(self):
        if self.trainer.iter == self.it:
            os.kill(os.getpid(), signal.SIGKILL)


class RecordLosses(HookBase):
    def __init__(self, path):
        self.path = path

    def after_train(self):
        if comm.is_main_process():
            s = self.trainer.storage
            out = {k: [[it, v] for v, it in s.history(k).values()]
                   for k in ("loss_cate", "loss_mask", "total_loss") if k in s.histories()}
            with open(self.path, "w") as f:
                json.dump(out, f)


def kill_during_save(name):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if name in str(getattr(f, "name", "")):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def main(args):
    register()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cfg = setup_cfg(args)
    if args.kill_during_save:
        kill_during_save(args.kill_during_save)
    trainer = Trainer(cfg)
    extra = [RecordLosses(os.path.join(cfg.OUTPUT_DIR, "losses_%d.json" % os.getpid()))]
    if args.kill_after_iter >= 0:
        extra.append(KillAfterIter(args.kill_after_iter))
    trainer.register_hooks(extra)
    trainer.resume_or_load(resume=args.resume)
    trainer.train()


register()

if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--kill-after-iter", type=int, default=-1)
    parser.add_argument("--kill-during-save", default="")
    args = parser.parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
'''


def make_driver_dataset(root: Path, name: str, num_images: int, seed: int) -> dict:
    """Write a tiny dataset for the driver; returns the env entries that make the driver see it."""
    dicts = write_dataset(root, name, num_images, seed=seed)
    for d in dicts:
        for a in d["annotations"]:
            a["bbox_mode"] = int(a["bbox_mode"])
    (root / f"{name}.json").write_text(json.dumps(dicts))
    (root / "driver.py").write_text(DRIVER)
    spec = {"name": name, "json": str(root / f"{name}.json"), "classes": list(CLASSES)}
    return {"SOLO_TEST_DATASET": json.dumps(spec), "SOLO_TEST_DRIVER": str(root / "driver.py")}


def driver_cmd(env, out_dir, *args, opts=()):
    return train_net_cmd(
        *args,
        "DATASETS.TRAIN", f"('{json.loads(env['SOLO_TEST_DATASET'])['name']}',)", "DATASETS.TEST", "()",
        "SEED", "0", "OUTPUT_DIR", str(out_dir), "MODEL.DEVICE", "cpu", *opts,
        script=env["SOLO_TEST_DRIVER"],
    )


def driver_env(extra, tmp_path):
    return subprocess_env(tmp_path, threads=1, **extra)


