"""Crash safety, exact resume, non-finite losses and safe weight loading.

The crash tests run training in a subprocess (a small driver that mirrors ``train_net.py`` and can
SIGKILL itself at a chosen point) and resume it with ``--resume``: the resumed run must reach
*exactly* the weights of an uninterrupted run (same seed, 1 thread, NUM_WORKERS 0).
"""
import hashlib
import io
import logging
import os
import pickle
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import get_event_storage

from helpers import driver_cmd, driver_env, finish, make_driver_dataset, start, tiny_cfg, write_dataset
from solo_d2.checkpoint import (
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
    UNSAFE_LOAD_ENV,
)
from solo_d2.data.samplers import ResumableTrainingSampler
from solo_d2.modeling.meta_arch import SOLO
from solo_d2.engine import Trainer

def state_of(model_file):
    return torch.load(model_file, map_location="cpu", weights_only=True)


# 4 iterations of batch 2, a checkpoint every 2 (after iterations 1 and 3) and model_final.
RUN_OPTS = ["SOLVER.MAX_ITER", "4", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def crash_runs(tmp_path_factory):
    """Reference run (in this process) + a run SIGKILLed after its iteration-1 checkpoint + a run SIGKILLed half-way
    through writing its iteration-3 checkpoint; then both interrupted runs resumed. Returns what
    the output folders held after the kills and after the resumes."""
    root = tmp_path_factory.mktemp("crash")
    env = driver_env(make_driver_dataset(root / "data", "crash_train", 8, seed=3), root)
    dirs = {k: root / k for k in ("reference", "killed_after_save", "killed_during_save")}
    procs = {
        "killed_after_save": start(
            driver_cmd(env, dirs["killed_after_save"], "--kill-after-iter", "1", opts=RUN_OPTS), env, root
        ),
        "killed_during_save": start(
            driver_cmd(env, dirs["killed_during_save"], "--kill-during-save", "model_0000003", opts=RUN_OPTS),
            env, root,
        ),
    }
    # The uninterrupted reference runs here meanwhile, with the driver's settings (saves a start-up).
    cfg = tiny_cfg()
    cfg.merge_from_list(
        RUN_OPTS + ["DATASETS.TRAIN", "('crash_train',)", "SEED", "0", "OUTPUT_DIR", str(dirs["reference"])]
    )
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        seed_all_rng(0)  # what default_setup does with SEED 0 on rank 0
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        del trainer
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    info = {"dirs": dirs, "first": {}, "resumed": {}}
    ref_files = sorted(os.listdir(dirs["reference"]))
    info["first"]["reference"] = {
        "rc": 0, "log": "", "files": ref_files, "tag": (dirs["reference"] / "last_checkpoint").read_text()
    }
    for k, p in procs.items():
        rc, out = finish(p)
        files = sorted(os.listdir(dirs[k]))
        tag = (dirs[k] / "last_checkpoint").read_text() if (dirs[k] / "last_checkpoint").exists() else None
        info["first"][k] = {"rc": rc, "log": out, "files": files, "tag": tag}
    resumes = {
        k: start(driver_cmd(env, dirs[k], "--resume", opts=RUN_OPTS), env, root)
        for k in ("killed_after_save", "killed_during_save")
    }
    for k, p in resumes.items():
        rc, out = finish(p)
        info["resumed"][k] = {"rc": rc, "log": out, "files": sorted(os.listdir(dirs[k]))}
    return info


def _assert_same_weights(a_file, b_file):
    a, b = state_of(a_file)["model"], state_of(b_file)["model"]
    assert a.keys() == b.keys()
    diff = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    assert not diff, f"{len(diff)} tensors differ, max abs diff {max(diff.values()):.3g}: {sorted(diff)[:5]}"


@pytest.mark.slow
def test_reference_run_trains(crash_runs):
    first = crash_runs["first"]["reference"]
    assert first["rc"] == 0, first["log"][-3000:]
    assert first["tag"] == "model_final.pth"
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth"} <= set(first["files"])
    assert not [f for f in first["files"] if ".tmp" in f]


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume_gives_identical_weights(crash_runs):
    first = crash_runs["first"]["killed_after_save"]
    assert first["rc"] == -signal.SIGKILL, first["log"][-3000:]
    assert first["tag"] == "model_0000001.pth"
    assert "model_0000003.pth" not in first["files"] and not [f for f in first["files"] if ".tmp" in f]
    resumed = crash_runs["resumed"]["killed_after_save"]
    assert resumed["rc"] == 0, resumed["log"][-3000:]
    assert "Starting training from iteration 2" in resumed["log"]
    assert "continuing the training sampler stream at image 4" in resumed["log"]
    dirs = crash_runs["dirs"]
    _assert_same_weights(dirs["killed_after_save"] / "model_final.pth", dirs["reference"] / "model_final.pth")
    # Same optimizer state (momentum) and scheduler position too.
    a = state_of(dirs["killed_after_save"] / "model_final.pth")
    b = state_of(dirs["reference"] / "model_final.pth")
    assert a["iteration"] == b["iteration"] == 3
    assert a["trainer"]["hooks"] == b["trainer"]["hooks"]  # LR scheduler, data order
    sa, sb = a["trainer"]["_trainer"]["optimizer"]["state"], b["trainer"]["_trainer"]["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[i]["momentum_buffer"], sb[i]["momentum_buffer"]) for i in sa)


@pytest.mark.slow
def test_sigkill_while_writing_a_checkpoint_then_resume(crash_runs):
    first = crash_runs["first"]["killed_during_save"]
    assert first["rc"] == -signal.SIGKILL, first["log"][-3000:]
    # The half-written file is a temp file; the checkpoint name and the tag never saw it.
    partial = [f for f in first["files"] if f.startswith(".model_0000003.pth.tmp")]
    assert partial, first["files"]
    assert "model_0000003.pth" not in first["files"]
    assert first["tag"] == "model_0000001.pth"
    resumed = crash_runs["resumed"]["killed_during_save"]
    assert resumed["rc"] == 0, resumed["log"][-3000:]
    assert "Starting training from iteration 2" in resumed["log"]
    dirs = crash_runs["dirs"]
    _assert_same_weights(dirs["killed_during_save"] / "model_final.pth", dirs["reference"] / "model_final.pth")
    _assert_same_weights(dirs["killed_during_save"] / "model_0000003.pth", dirs["reference"] / "model_0000003.pth")
    assert not [f for f in resumed["files"] if ".tmp" in f], resumed["files"]  # the orphan is gone


# ------------------------------------------------------------------------------------ NaN losses
class _HashCheckpoints(HookBase):
    """Records the sha256 of each checkpoint file right after the checkpointer wrote it."""

    def __init__(self, folder):
        self.folder, self.hashes = Path(folder), {}

    def after_step(self):
        for f in self.folder.glob("model_*.pth"):
            if f.name not in self.hashes:
                self.hashes[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    write_dataset(tmp_path_factory.mktemp("rel"), "reliability_train", 4, seed=1)
    return "reliability_train"


@pytest.mark.slow
def test_nan_loss_stops_training_naming_term_and_iteration(small_dataset, tmp_path, monkeypatch):
    real_losses = SOLO.losses

    def losses(self, *args, **kwargs):
        out = real_losses(self, *args, **kwargs)
        if get_event_storage().iter == 5:
            out["loss_cate"] = out["loss_cate"] * float("nan")
        return out

    monkeypatch.setattr(SOLO, "losses", losses)
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = (small_dataset,)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = 10
    cfg.SOLVER.CHECKPOINT_PERIOD = 2
    cfg.SEED = 0
    cfg.OUTPUT_DIR = str(tmp_path)
    trainer = Trainer(cfg)
    hashes = _HashCheckpoints(tmp_path)
    trainer.register_hooks([hashes])
    trainer.resume_or_load(resume=False)
    weights_before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(FloatingPointError) as exc:
        trainer.train()
    msg = str(exc.value)
    assert "loss_cate = nan" in msg and "iteration 5" in msg, msg
    assert "loss_mask" in msg  # the other terms are listed too
    # Stopped before the optimizer step of iteration 5: weights are those after iteration 4.
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(weights_before[k], v) for k, v in trainer.model.state_dict().items())
    # The last good checkpoint is intact and still the one tagged; nothing else was written.
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["model_0000001.pth", "model_0000003.pth"]
    assert not list(tmp_path.glob(".*tmp*"))
    assert hashes.hashes["model_0000003.pth"] == hashlib.sha256((tmp_path / "model_0000003.pth").read_bytes()).hexdigest()
    assert state_of(tmp_path / "model_0000003.pth")["iteration"] == 3


def test_nan_weights_are_never_saved(tmp_path):
    model = Trainer.build_model(tiny_cfg())
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path))
    ckpt.save("model_good")
    good = (tmp_path / "model_good.pth").read_bytes()
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        ckpt.save("model_bad")
    assert not (tmp_path / "model_bad.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_good.pth"
    assert (tmp_path / "model_good.pth").read_bytes() == good


def test_failed_save_leaves_previous_checkpoint_and_no_partial_file(tmp_path, monkeypatch):
    model = Trainer.build_model(tiny_cfg())
    ckpt = SafeDetectionCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001")
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save("model_0000003")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert ckpt.get_checkpoint_file() == str(tmp_path / "model_0000001.pth")


# ------------------------------------------------------------------------------ data order
@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resumable_sampler_continues_the_stream(shuffle, world_size):
    size, batch, done = 7, 6, 5  # 5 iterations of total batch 6 = 30 images, 4+ epochs
    import itertools

    def rank_streams(start):
        streams = []
        for r in range(world_size):
            s = ResumableTrainingSampler(size, shuffle=shuffle, seed=42, start=start)
            s._rank, s._world_size = r, world_size
            streams.append(iter(s))
        return streams

    def batches(streams, n):  # the union of the ranks' per-iteration batches, in rank order
        per_rank = batch // world_size
        return [sum((list(itertools.islice(st, per_rank)) for st in streams), []) for _ in range(n)]

    full = batches(rank_streams(0), done + 4)
    resumed = batches(rank_streams(done * batch), 4)
    assert resumed == full[done:]
    # The global stream is the stock TrainingSampler's, whatever the number of ranks.
    single = list(itertools.islice(iter(ResumableTrainingSampler(size, shuffle=shuffle, seed=42)), batch * (done + 4)))
    assert sorted(sum(full, [])) == sorted(single)
    if world_size == 1:
        from detectron2.data.samplers import TrainingSampler

        assert sum(full, []) == list(itertools.islice(iter(TrainingSampler(size, shuffle=shuffle, seed=42)), len(single)))


# ------------------------------------------------------------------------------ safe loading
class _WritesMarker:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return Trainer.build_model(tiny_cfg())


def test_malicious_pth_is_refused_and_runs_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv(UNSAFE_LOAD_ENV, raising=False)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_model.state_dict(), "extra": _WritesMarker(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as exc:
        SafeDetectionCheckpointer(tiny_model).load(str(path))
    assert not marker.exists()
    msg = str(exc.value)
    assert "evil.pth" in msg and "arbitrary unpickling" in msg and "--unsafe-load" in msg
    assert UNSAFE_LOAD_ENV in msg and "exec" in msg  # names the offending global
    # Opting in (constructor argument or environment variable) loads it -- and runs its code.
    SafeDetectionCheckpointer(tiny_model, allow_unsafe_load=True).load(str(path))
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv(UNSAFE_LOAD_ENV, "1")
    SafeDetectionCheckpointer(tiny_model).load(str(path))
    assert marker.exists()


def test_malicious_pkl_is_refused_and_model_zoo_pkl_loads(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv(UNSAFE_LOAD_ENV, raising=False)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"model": {}, "__author__": _WritesMarker(marker)}))
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.pkl.*builtins\.exec"):
        SafeDetectionCheckpointer(tiny_model).load(str(evil))
    assert not marker.exists()
    # A Detectron2 model-zoo style .pkl (numpy arrays) loads without the opt-in.
    sd = {k: v.numpy() + 1 for k, v in tiny_model.state_dict().items() if k.startswith("head.")}
    good = tmp_path / "zoo.pkl"
    good.write_bytes(pickle.dumps({"model": sd, "__author__": "test"}))
    torch.manual_seed(1)
    model = Trainer.build_model(tiny_cfg())
    SafeDetectionCheckpointer(model).load(str(good))
    loaded = model.state_dict()
    assert all(np.array_equal(loaded[k].numpy(), v) for k, v in sd.items())


def test_own_checkpoint_loads_with_weights_only(tiny_model, tmp_path):
    SafeDetectionCheckpointer(tiny_model, str(tmp_path)).save("model_x", iteration=3)
    torch.manual_seed(1)
    model = Trainer.build_model(tiny_cfg())
    extra = SafeDetectionCheckpointer(model).load(str(tmp_path / "model_x.pth"))
    assert extra["iteration"] == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values()))


def test_mismatched_shapes_are_reported_per_key_and_skipped(tiny_model, tmp_path):
    path = tmp_path / "four_classes.pth"
    torch.save({"model": tiny_model.state_dict()}, path)
    model = Trainer.build_model(tiny_cfg(**{"MODEL.SOLO.NUM_CLASSES": 3}))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    src = tiny_model.state_dict()
    mismatched = sorted(k for k, v in model.state_dict().items() if v.shape != src[k].shape)
    assert mismatched  # the category output conv
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    ckpt = SafeDetectionCheckpointer(model, strict_heads=False)  # fine-tuning: warn, keep going
    ckpt.logger.addHandler(handler)
    try:
        ckpt.load(str(path))
    finally:
        ckpt.logger.removeHandler(handler)
    log = stream.getvalue()
    for k in mismatched:
        assert re.search(rf"Skip loading parameter '{re.escape(k)}'.*{re.escape(str(tuple(src[k].shape)))}", log), log
        assert torch.equal(model.state_dict()[k], before[k])  # skipped: keeps its initial value
    assert f"{len(mismatched)} parameter(s) were NOT loaded" in log
    for k, v in model.state_dict().items():
        if k not in mismatched:
            assert torch.equal(v, src[k]), k


def test_atomic_write_leaves_a_live_writers_temp_file_and_removes_a_dead_ones(tmp_path):
    # Two processes writing one path (two ranks generating the shapes dataset): neither may delete
    # the other's temp file as stale, or the other's rename fails. A dead writer's file goes.
    import subprocess
    import sys

    from solo_d2.utils.file_io import atomic_write

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        live_tmp = tmp_path / f".a.json.tmp-{live.pid}"
        dead_tmp = tmp_path / f".a.json.tmp-{dead.pid}"
        live_tmp.write_text("half written")
        dead_tmp.write_text("left by a kill")
        atomic_write(tmp_path / "a.json", lambda f: f.write(b"{}"))
        assert (tmp_path / "a.json").read_text() == "{}"
        assert live_tmp.exists() and not dead_tmp.exists()
    finally:
        live.kill()
        live.wait()
