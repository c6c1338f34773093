"""Precision follows the hardware: bfloat16 autocast (training AMP and MODEL.SOLO.INFERENCE_DTYPE)
only where the CPU executes bfloat16 natively, float32 with one log line elsewhere, and a forced
bfloat16 with a WARNING (solo_d2.config.native_bfloat16 / autocast_dtype)."""
import logging

import pytest
import torch
from detectron2.modeling import build_model

import solo_d2.config as solo_config
from helpers import REPO, amp_trainer, finish, start, subprocess_env, tiny_cfg, train_net_cmd, write_dataset
from solo_d2.config import autocast_dtype, native_bfloat16
from solo_d2.engine import CheckedCPUAutocastTrainer, CheckedSimpleTrainer, amp_precision

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cpu(monkeypatch, machine="x86_64", bf16=False, amx=False, capability="AVX512", isa=None,
         arm_features=()):
    """Pretend to be a CPU: its architecture, hardware flags, PyTorch's dispatch capability
    (ATEN_CPU_CAPABILITY) and oneDNN's ISA limit (ONEDNN_MAX_CPU_ISA)."""
    monkeypatch.setattr(solo_config.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(solo_config, "_arm_cpu_features", lambda: set(arm_features))
    if isa is None:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)


#: (CPU, native bfloat16?)
CPUS = [
    (dict(bf16=True), True),  # Cooper Lake / Zen 4: AVX512-BF16
    (dict(amx=True), True),  # Sapphire Rapids: AMX
    (dict(bf16=True, amx=True, isa="AVX512_CORE_AMX"), True),
    (dict(), False),  # AVX512 without BF16 (Skylake / Cascade Lake / Ice Lake servers)
    (dict(capability="AVX2"), False),  # Zen 2/3, Haswell-Coffee Lake: AVX2 only
    (dict(bf16=True, capability="AVX2"), False),  # ATEN_CPU_CAPABILITY=avx2 on a BF16 CPU
    (dict(bf16=True, isa="AVX2"), False),  # ONEDNN_MAX_CPU_ISA=AVX2 on a BF16 CPU
    (dict(bf16=True, isa="AVX512_CORE"), False),
    (dict(machine="aarch64", capability="DEFAULT", arm_features=("fp", "asimd", "bf16")), True),
    (dict(machine="aarch64", capability="DEFAULT", arm_features=("fp", "asimd")), False),
    (dict(machine="riscv64", capability="DEFAULT"), False),
]


@pytest.mark.parametrize("cpu, native", CPUS)
def test_native_bfloat16_per_cpu_capability(monkeypatch, cpu, native):
    _cpu(monkeypatch, **cpu)
    assert native_bfloat16("cpu") is native


@pytest.fixture
def config_log():
    """The records of solo_d2.config's logger. Captured on the logger itself: once any test has
    run Detectron2's setup_logger, the "detectron2" logger stops propagating to pytest's caplog."""
    records = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger("detectron2.solo_d2.config")
    handler, level = _Keep(logging.DEBUG), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(level)


@pytest.mark.parametrize("cpu, native", CPUS)
def test_autocast_dtype_falls_back_to_float32_only_where_bfloat16_is_emulated(monkeypatch, config_log, cpu, native):
    _cpu(monkeypatch, **cpu)
    chosen = autocast_dtype("bfloat16", "cpu", key="SOLVER.AMP.PRECISION", explicit=False)
    assert chosen == (torch.bfloat16 if native else None)
    lines = config_log
    if native:
        assert lines == []
    else:  # one line saying so and why, naming the key and the CPU
        assert len(lines) == 1 and lines[0].levelno == logging.INFO
        msg = lines[0].getMessage()
        assert "SOLVER.AMP.PRECISION: running in float32, not bfloat16" in msg
        assert "AVX512-BF16 or AMX" in msg and torch.backends.cpu.get_cpu_capability() in msg


def test_forced_bfloat16_on_an_emulating_cpu_runs_with_a_warning(monkeypatch, config_log):
    _cpu(monkeypatch, capability="AVX2")
    chosen = autocast_dtype("bfloat16", "cpu", key="MODEL.SOLO.INFERENCE_DTYPE", explicit=True)
    assert chosen == torch.bfloat16
    (rec,) = config_log
    assert rec.levelno == logging.WARNING and "emulated" in rec.getMessage()


def test_autocast_dtype_refuses_float16_on_cpu_and_unknown_names():
    assert autocast_dtype("float32", "cpu", key="K", explicit=True) is None
    with pytest.raises(ValueError, match="K = 'float16' with MODEL.DEVICE = 'cpu'"):
        autocast_dtype("float16", "cpu", key="K", explicit=True)
    with pytest.raises(ValueError, match="K = 'fp8'"):
        autocast_dtype("fp8", "cpu", key="K", explicit=True)


@pytest.mark.parametrize("native", [True, False])
def test_amp_precision_follows_the_cpu_unless_forced(monkeypatch, native):
    _cpu(monkeypatch, bf16=native, capability="AVX512" if native else "AVX2")
    cfg = tiny_cfg()
    assert amp_precision(cfg) is None  # AMP off
    cfg.SOLVER.AMP.ENABLED = True
    assert amp_precision(cfg) == (torch.bfloat16 if native else None)  # "": where it is fast
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    assert amp_precision(cfg) == torch.bfloat16  # forced
    cfg.MODEL.DEVICE = "cuda"  # only read, nothing runs on CUDA
    cfg.SOLVER.AMP.PRECISION = ""
    assert amp_precision(cfg) == torch.float16
    cfg.MODEL.DEVICE = "cpu"
    cfg.SOLVER.AMP.PRECISION = "float16"
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION = 'float16' with MODEL.DEVICE = 'cpu'"):
        amp_precision(cfg)
    cfg.SOLVER.AMP.PRECISION = "fp8"
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION = 'fp8'"):
        amp_precision(cfg)


@pytest.mark.parametrize("native", [True, False])
def test_inference_dtype_auto_and_forced(monkeypatch, native):
    _cpu(monkeypatch, bf16=native, capability="AVX512" if native else "AVX2")
    auto = build_model(tiny_cfg(**{"MODEL.SOLO.INFERENCE_DTYPE": "auto"}))
    assert auto.inference_dtype == ("bfloat16" if native else "float32")
    forced = build_model(tiny_cfg(**{"MODEL.SOLO.INFERENCE_DTYPE": "bfloat16"}))
    assert forced.inference_dtype == "bfloat16"
    with pytest.raises(ValueError, match="MODEL.SOLO.INFERENCE_DTYPE must be one of .*'auto'.*got 'half'"):
        build_model(tiny_cfg(**{"MODEL.SOLO.INFERENCE_DTYPE": "half"}))


def test_amp_on_an_emulating_cpu_trains_in_float32(monkeypatch, tiny_dataset, tmp_path):
    _cpu(monkeypatch, bf16=False, capability="AVX2")  # an AVX2-only CPU
    trainer, dtypes = amp_trainer(tiny_dataset, tmp_path, steps=2)
    assert type(trainer._trainer) is CheckedSimpleTrainer
    trainer.train()
    assert dtypes == [torch.float32] * (2 * 5)  # 2 steps x 5 levels


def test_amp_on_a_native_bfloat16_cpu_trains_in_bfloat16(monkeypatch, tiny_dataset, tmp_path):
    # The decision only (the CPU is pretended): where bfloat16 is native, AMP's "" picks it.
    _cpu(monkeypatch, bf16=True)
    trainer, dtypes = amp_trainer(tiny_dataset, tmp_path, steps=1)
    assert isinstance(trainer._trainer, CheckedCPUAutocastTrainer)
    assert trainer._trainer.precision == torch.bfloat16
    trainer.train()
    assert dtypes == [torch.bfloat16] * 5


@pytest.mark.slow
def test_train_net_with_amp_under_avx2_emulation_trains_in_float32(tmp_path, tiny_dataset):
    # A real process whose PyTorch and oneDNN are limited to AVX2 (how an AVX2-only CPU is
    # reproduced on a larger one): SOLVER.AMP.ENABLED gives float32 and says why, in the log.
    env = subprocess_env(tmp_path, threads=1, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    root = tmp_path / "data"
    write_dataset(root, "solo_amp_avx2", 4, seed=0)
    rc, out = finish(start(train_net_cmd(
        "--train-json", str(root / "solo_amp_avx2_coco_format.json"), "--train-images", str(root),
        "SOLVER.AMP.ENABLED", "True", "SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ), env, REPO))
    assert rc == 0, out[-3000:]
    assert "SOLVER.AMP.PRECISION: running in float32, not bfloat16" in out
    assert "(AVX2, no native bfloat16)" in out
