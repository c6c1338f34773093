"""Every shipped config loads on top of add_solo_config and builds the model it describes."""
from pathlib import Path

import pytest
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import solo_d2
from helpers import REPO, solo_test_cfg

CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml"))


def _load(path):
    return solo_test_cfg(str(REPO / path))


def test_all_configs_are_listed():
    names = {Path(c).name for c in CONFIGS}
    for expected in [
        "Base-SOLO.yaml", "SOLO_R50_1x.yaml", "SOLO_R50_3x.yaml", "SOLO_R101_3x.yaml",
        "DecoupledSOLO_R50_1x.yaml", "DecoupledSOLO_R50_3x.yaml",
        "DecoupledSOLO_Light_R50_3x.yaml", "DecoupledSOLO_Light_DCN_R50_3x.yaml",
    ]:
        assert expected in names


@pytest.mark.parametrize("path", CONFIGS)
def test_config_builds(path):
    cfg = _load(path)
    model = build_model(cfg)
    assert type(model).__name__ == "SOLO"
    assert type(model.head).__name__ == cfg.MODEL.SOLO.HEAD_TYPE
    assert len(model.head.num_grids) == len(cfg.MODEL.SOLO.IN_FEATURES)


def test_reference_defaults():
    cfg = _load("configs/COCO-InstanceSegmentation/SOLO_R50_1x.yaml")
    s = cfg.MODEL.SOLO
    assert s.NUM_GRIDS == [40, 36, 24, 16, 12] and s.NUM_STACKED_CONVS == 7 and s.CONV_CHANNELS == 256
    assert s.SCALE_RANGES == [[1, 96], [48, 192], [96, 384], [192, 768], [384, 2048]]
    assert (s.SIGMA, s.LOSS_MASK_WEIGHT, s.FOCAL_LOSS_ALPHA, s.FOCAL_LOSS_GAMMA) == (0.2, 3.0, 0.25, 2.0)
    assert (s.SCORE_THRESH_TEST, s.MASK_THRESH_TEST, s.NMS_PRE, s.NMS_SIGMA) == (0.1, 0.5, 500, 2.0)
    assert (s.UPDATE_THRESH_TEST, s.MAX_PER_IMAGE, s.NMS_KERNEL) == (0.05, 100, "gaussian")
    assert cfg.SOLVER.CLIP_GRADIENTS_FULL_MODEL_NORM == 35.0 and cfg.SOLVER.BASE_LR == 0.01
    assert cfg.INPUT.MASK_FORMAT == "bitmask" and cfg.MODEL.MASK_ON
    assert cfg.SOLVER.OPTIMIZER == "SGD" and (s.PRIOR_PROB, s.MASK_PRIOR_PROB) == (0.01, 0.0)
    light = _load("configs/COCO-InstanceSegmentation/DecoupledSOLO_Light_DCN_R50_3x.yaml")
    assert light.MODEL.SOLO.NUM_STACKED_CONVS == 4 and light.MODEL.SOLO.NUM_DEFORMABLE_CONVS == 1
    assert light.INPUT.MIN_SIZE_TEST == 512 and light.INPUT.MAX_SIZE_TEST == 852
    assert light.MODEL.SOLO.SCALE_RANGES[0] == [1, 64]


def test_add_solo_config_is_idempotent_and_local():
    cfg = get_cfg()
    solo_d2.add_solo_config(cfg)
    cfg.MODEL.SOLO.NUM_CLASSES = 3
    solo_d2.add_solo_config(cfg)
    assert cfg.MODEL.SOLO.NUM_CLASSES == 3
    assert "SOLO" not in get_cfg().MODEL  # Detectron2's global defaults are untouched


@pytest.mark.slow
def test_flop_count_traces_the_model():
    # Detectron2's FlopCountAnalysis traces the model with the JIT tracer (also what export
    # tools do): the whole inference path, postprocess included, must be traceable.
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "analyze_model.py"), "--config-file",
         str(REPO / "configs" / "tests" / "SOLO_tiny.yaml"), "--size", "128", "128",
         "--num-inputs", "1", "--tasks", "flop"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GFLOPs at 128x128" in proc.stdout
