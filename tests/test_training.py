"""Training with Detectron2's engine: the tiny model must learn, evaluation must produce COCO
mask AP, and train_net.py must train and evaluate (its multi-process runs: test_distributed.py)."""

import numpy as np
import pytest
import torch

from helpers import amp_trainer, run_train_net, tiny_cfg, write_dataset
from solo_d2.engine import CheckedCPUAutocastTrainer, Trainer, add_full_model_gradient_clipping


# An untrained model predicts nothing at the default thresholds; these make it predict.
LOW_THRESHOLDS = {
    "MODEL.SOLO.SCORE_THRESH_TEST": 0.0,
    "MODEL.SOLO.MASK_THRESH_TEST": 0.0,
    "MODEL.SOLO.UPDATE_THRESH_TEST": 0.0,
    "MODEL.SOLO.MAX_PER_IMAGE": 5,
}
LOW_THRESHOLD_OPTS = [str(x) for kv in LOW_THRESHOLDS.items() for x in kv]


@pytest.fixture(scope="module")
def few_images(tmp_path_factory):
    """4 images with 1-3 objects of 24-80 px: what the learning test overfits."""
    write_dataset(tmp_path_factory.mktemp("few"), "solo_few", 4, seed=0, min_size=24, max_size=80, max_objects=3)
    return "solo_few"


@pytest.mark.slow
@pytest.mark.parametrize(
    "head, amp",
    [("SOLOHead", False), ("DecoupledSOLOHead", True), ("SOLOv2Head", False)],
)
def test_tiny_model_overfits_a_few_images(head, amp, few_images, tmp_path):
    # amp: SOLVER.AMP.ENABLED as the shapes demo trains (bfloat16 autocast where the CPU has
    # native bfloat16, else float32, which the other heads train in). 200 iterations reach mask
    # AP 94-97 on these images (SOLO, Decoupled SOLO in float32 and bfloat16, SOLOv2).
    cfg = tiny_cfg(head)
    cfg.SOLVER.AMP.ENABLED = amp
    cfg.DATASETS.TRAIN = (few_images,)
    cfg.DATASETS.TEST = (few_images,)
    cfg.SOLVER.BASE_LR = 0.04
    cfg.SOLVER.MAX_ITER = 200
    cfg.SOLVER.STEPS = (160,)
    if head == "SOLOv2Head":
        # The official SOLOv2 warm-up (from 1% of the LR, here over 50 iterations): at once at a
        # third of 0.04 the dynamic kernels saturate every mask within ~10 steps (BENCHMARKS.md).
        cfg.SOLVER.WARMUP_FACTOR = 0.01
        cfg.SOLVER.WARMUP_ITERS = 50
    cfg.OUTPUT_DIR = str(tmp_path)
    torch.manual_seed(0)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = Trainer.test(cfg, trainer.model)
    assert results["segm"]["AP"] >= 90, results["segm"]
    assert results["bbox"]["AP"] > 50, results["bbox"]  # boxes are derived from the masks


def _gt_as_predictions(dataset_name, relabel=lambda c: c):
    """(inputs, outputs) pairs for an evaluator: every GT instance predicted with its exact mask,
    score 1 and class ``relabel(class)``."""
    import pycocotools.mask as mask_util
    from detectron2.data import DatasetCatalog
    from detectron2.structures import BitMasks, Instances

    for d in DatasetCatalog.get(dataset_name):
        inst = Instances((d["height"], d["width"]))
        masks = [mask_util.decode(a["segmentation"]).astype(bool) for a in d["annotations"]]
        inst.pred_masks = torch.from_numpy(np.stack(masks))
        inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
        inst.scores = torch.ones(len(masks))
        inst.pred_classes = torch.tensor([relabel(a["category_id"]) for a in d["annotations"]])
        yield [{"image_id": d["image_id"], "height": d["height"], "width": d["width"]}], [{"instances": inst}]


@pytest.mark.parametrize("relabel, expected_ap", [(lambda c: c, 100.0), (lambda c: (c + 1) % 4, 0.0)])
def test_coco_evaluator_scores_known_predictions(tiny_dataset, tmp_path, relabel, expected_ap):
    # The GT itself as predictions: AP 100 for masks and boxes; the same masks with every class
    # wrong: no true positive in any class, AP 0.
    cfg = tiny_cfg()
    evaluator = Trainer.build_evaluator(cfg, tiny_dataset, str(tmp_path))
    evaluator.reset()
    for inputs, outputs in _gt_as_predictions(tiny_dataset, relabel):
        evaluator.process(inputs, outputs)
    results = evaluator.evaluate()
    assert set(results) == {"bbox", "segm"}
    assert results["segm"]["AP"] == pytest.approx(expected_ap)
    assert results["bbox"]["AP"] == pytest.approx(expected_ap)


@pytest.mark.slow
def test_trainer_test_writes_the_coco_results(tiny_dataset, tmp_path):
    # An untrained model still goes through the whole evaluation path.
    cfg = tiny_cfg(**LOW_THRESHOLDS)
    cfg.DATASETS.TEST = (tiny_dataset,)
    cfg.OUTPUT_DIR = str(tmp_path)
    model = Trainer.build_model(cfg)  # untrained: low thresholds make it predict something
    results = Trainer.test(cfg, model)
    assert set(results) == {"bbox", "segm"}
    assert (tmp_path / "inference" / tiny_dataset / "coco_instances_results.json").is_file()


@pytest.mark.slow
def test_amp_on_cpu_runs_the_forward_in_bfloat16_and_keeps_float32_weights(few_images, tmp_path):
    # bfloat16 forced (SOLVER.AMP.PRECISION), so that it runs whatever this CPU has; where the
    # CPU has no native bfloat16 "" would train in float32 (tests/test_precision.py).
    trainer, dtypes = amp_trainer(few_images, tmp_path, steps=3, precision="bfloat16")
    assert isinstance(trainer._trainer, CheckedCPUAutocastTrainer)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert dtypes == [torch.bfloat16] * (3 * 5)  # 3 steps x 5 levels
    after = trainer.model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in after.items())
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    assert not torch.equal(before["head.cate_pred.weight"], after["head.cate_pred.weight"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_full_model_gradient_clipping():
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(1))
    opt = add_full_model_gradient_clipping(torch.optim.SGD, 1.0)([{"params": [p]}, {"params": [q]}], lr=1.0)
    p.grad = torch.tensor([3.0, 0.0])
    q.grad = torch.tensor([4.0])  # total norm 5 -> scaled by 1/5 across both groups
    opt.step()
    assert torch.allclose(p.data, torch.tensor([-0.6, 0.0])) and torch.allclose(q.data, torch.tensor([-0.8]))


@pytest.mark.parametrize("name, cls", [("SGD", torch.optim.SGD), ("ADAMW", torch.optim.AdamW), ("adamw", torch.optim.AdamW)])
def test_build_optimizer_sgd_or_adamw_with_full_model_clipping(name, cls):
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = name
    cfg.SOLVER.BETAS = (0.8, 0.9)
    cfg.SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM = 1.0
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.GroupNorm(1, 2))
    opt = Trainer.build_optimizer(cfg, model)
    assert isinstance(opt, cls) and type(opt).__name__.endswith("WithFullModelClipping")
    assert opt.defaults["lr"] == cfg.SOLVER.BASE_LR
    if cls is torch.optim.AdamW:
        assert opt.defaults["betas"] == (0.8, 0.9)
    # Detectron2's parameter groups: no weight decay on the GroupNorm (WEIGHT_DECAY_NORM 0).
    norm_groups = [g for g in opt.param_groups if any(p is model[1].weight for p in g["params"])]
    assert norm_groups and norm_groups[0]["weight_decay"] == cfg.SOLVER.WEIGHT_DECAY_NORM
    # One clipped step: all gradients together scaled to norm 1 before the update.
    for p in model.parameters():
        p.grad = torch.full_like(p, 10.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_unknown_optimizer_names_the_key():
    cfg = tiny_cfg()
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER = 'LAMB'"):
        Trainer.build_optimizer(cfg, torch.nn.Linear(2, 2))


def _train_net(args, tmp_path, timeout=600):
    proc = run_train_net(args, tmp_path, timeout=timeout, threads=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_train_net_trains_evaluates_and_evaluates_only(tmp_path):
    out_dir = tmp_path / "out"
    log = _train_net(
        [
            "DATASETS.TRAIN", "('shapes_train',)", "DATASETS.TEST", "('shapes_val',)",
            "SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "OUTPUT_DIR", str(out_dir),
            *LOW_THRESHOLD_OPTS,
        ],
        tmp_path,
    )
    assert "Evaluation results for segm" in log
    assert (out_dir / "model_final.pth").is_file()
    log = _train_net(
        [
            "--eval-only", "DATASETS.TEST", "('shapes_val',)", "OUTPUT_DIR", str(out_dir / "eval"),
            "MODEL.WEIGHTS", str(out_dir / "model_final.pth"), *LOW_THRESHOLD_OPTS,
        ],
        tmp_path,
    )
    assert "Evaluation results for segm" in log
