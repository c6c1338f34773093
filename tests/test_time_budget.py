"""SOLVER.TIME_BUDGET_MINUTES: a probe of the step time sizes the schedule to the machine
(solo_d2.engine.time_budget)."""
import json

import pytest

from helpers import tiny_cfg
from solo_d2.engine import Trainer, fit_to_time_budget, measure_step_time, time_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cfg(tmp_path, minutes, max_iter=3000, steps=(2700,), warmup=50, channels_last=False):
    cfg = tiny_cfg(**{"SOLVER.TIME_BUDGET_MINUTES": minutes, "SOLVER.MAX_ITER": max_iter,
                      "SOLVER.STEPS": steps, "SOLVER.WARMUP_ITERS": warmup,
                      "MODEL.SOLO.CHANNELS_LAST": channels_last, "OUTPUT_DIR": str(tmp_path)})
    cfg.freeze()
    return cfg


def _fake_measure(seconds):
    """A probe whose step time depends on the layout: {channels_last: seconds}."""
    calls = []

    def measure(trainer_cls, cfg):
        calls.append(cfg.MODEL.SOLO.CHANNELS_LAST)
        return seconds[cfg.MODEL.SOLO.CHANNELS_LAST]

    return measure, calls


def test_schedule_scaled_to_the_budget_in_the_faster_layout(tmp_path):
    measure, calls = _fake_measure({False: 0.4, True: 0.3})
    cfg = _cfg(tmp_path, minutes=10)
    fitted = fit_to_time_budget(Trainer, cfg, measure=measure)
    assert sorted(calls) == [False, True]  # both layouts probed
    # 600 s / (0.3 s * 1.15 margin) = 1739.1 -> 1739 iterations; factor 1739 / 3000
    assert fitted.SOLVER.MAX_ITER == 1739
    assert tuple(fitted.SOLVER.STEPS) == (round(2700 * 1739 / 3000),) == (1565,)
    assert fitted.SOLVER.WARMUP_ITERS == round(50 * 1739 / 3000) == 29
    assert fitted.MODEL.SOLO.CHANNELS_LAST is True
    assert fitted.is_frozen() and cfg.SOLVER.MAX_ITER == 3000  # the input cfg is unchanged
    saved = json.loads((tmp_path / "time_budget.json").read_text())
    assert saved["max_iter"] == 1739 and saved["channels_last"] is True
    assert saved["seconds_per_iteration"] == {"standard": 0.4, "channels_last": 0.3}
    assert "machine" in saved


def test_a_generous_budget_keeps_the_configured_schedule(tmp_path):
    measure, _ = _fake_measure({False: 0.1, True: 0.2})
    fitted = fit_to_time_budget(Trainer, _cfg(tmp_path, minutes=60), measure=measure)
    assert fitted.SOLVER.MAX_ITER == 3000 and tuple(fitted.SOLVER.STEPS) == (2700,)
    assert fitted.SOLVER.WARMUP_ITERS == 50 and fitted.MODEL.SOLO.CHANNELS_LAST is False


def test_a_later_run_in_the_same_output_dir_reuses_the_fitted_schedule(tmp_path):
    measure, calls = _fake_measure({False: 0.4, True: 0.3})
    first = fit_to_time_budget(Trainer, _cfg(tmp_path, minutes=10), measure=measure)
    slower, later_calls = _fake_measure({False: 1.0, True: 1.0})
    again = fit_to_time_budget(Trainer, _cfg(tmp_path, minutes=10), measure=slower)
    assert later_calls == []  # --resume keeps the schedule its checkpoints were made with
    assert again.SOLVER.MAX_ITER == first.SOLVER.MAX_ITER and again.MODEL.SOLO.CHANNELS_LAST
    # Another budget probes again.
    other = fit_to_time_budget(Trainer, _cfg(tmp_path, minutes=5), measure=slower)
    assert sorted(later_calls) == [False, True] and other.SOLVER.MAX_ITER == int(300 / 1.15)


def test_off_negative_and_too_small_budgets(tmp_path):
    cfg = _cfg(tmp_path, minutes=0)
    assert fit_to_time_budget(Trainer, cfg, measure=None) is cfg
    with pytest.raises(ValueError, match="SOLVER.TIME_BUDGET_MINUTES = -1: must be a whole number of minutes >= 0"):
        fit_to_time_budget(Trainer, _cfg(tmp_path, minutes=-1), measure=None)
    measure, _ = _fake_measure({False: 120.0, True: 120.0})
    with pytest.raises(ValueError, match="one iteration takes 120.00 s here, longer than the budget"):
        fit_to_time_budget(Trainer, _cfg(tmp_path, minutes=1), measure=measure)


def test_trainer_probes_and_trains_the_fitted_schedule(tiny_dataset, tmp_path, monkeypatch):
    # The real probe on the tiny model (one step per layout): both layouts timed, the budget
    # (1 hour) larger than the configured 2 iterations, so the trainer runs exactly those.
    monkeypatch.setattr(time_budget, "PROBE_STEPS", 1)
    monkeypatch.setattr(time_budget, "PROBE_WARMUP", 0)
    cfg = _cfg(tmp_path, minutes=60, max_iter=2, steps=(), warmup=1)
    cfg.defrost()
    cfg.DATASETS.TRAIN = (tiny_dataset,)
    cfg.SOLVER.IMS_PER_BATCH = 2
    assert measure_step_time(Trainer, cfg, steps=1, warmup=0) > 0
    trainer = Trainer(cfg)
    saved = json.loads((tmp_path / "time_budget.json").read_text())
    assert set(saved["seconds_per_iteration"]) == {"standard", "channels_last"}
    assert all(s > 0 for s in saved["seconds_per_iteration"].values())
    assert trainer.max_iter == 2 == saved["max_iter"]
    assert trainer.model.channels_last is saved["channels_last"]
    trainer.train()
    assert trainer.iter == 2
