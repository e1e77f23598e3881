"""Data-parallel fine-tuning under msrun: two real CPU workers (MindSpore's "mccl" backend).

1. One SGD step on two ranks (2 images each) gives both ranks identical weights, equal
   (1e-5) to one single-process step on the union of the two batches, with
   batch-norm statistics frozen (per-rank batch statistics would otherwise differ
   from the union's) and dropout off. A single-process step on rank 0's half alone
   is visibly different, so the comparison can fail.
2. `vehiclenet finetune` under msrun: data sharded by rank (half the steps per
   worker), one checkpoint set, written by rank 0 only.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support.checkpoints import write_published_layout
from support.processes import free_port
from support.training import make_dataset

ROOT = Path(__file__).resolve().parents[2]
MSRUN = Path(sys.executable).parent / "msrun"
SIZE = 64
LR = 0.5  # large, so that averaged and non-averaged gradients give clearly different weights

WORKER = r'''
import sys
import numpy as np
import mindspore as ms
from vehiclenet.training import finetune as ft
from vehiclenet.model.checkpoint import load_weights
from vehiclenet.model.device import configure
from vehiclenet.model.network import VehicleNet

init_ckpt, batch_file, out_file, mode, precision = sys.argv[1:6]
data = np.load(batch_file)
x, y = data["x"], data["y"]
if mode == "parallel":
    rank, size = ft.init_data_parallel("CPU")
    half = len(x) // size
    x, y = x[rank * half:(rank + 1) * half], y[rank * half:(rank + 1) * half]  # this rank's shard
else:
    configure("CPU")
    rank, size = 0, 1
    if mode == "half":
        x, y = x[:2], y[:2]
    if mode == "other_half":
        x, y = x[2:], y[2:]
ms.set_seed(0)
if precision == "bf16":  # the oneDNN kernels' bf16 training convolutions
    from vehiclenet.model.backend import KernelBackend
    from vehiclenet.model.cpu_kernels import library_path
    net = VehicleNet(num_classes=3, backend=KernelBackend(library_path(), "bf16"))
else:
    net = VehicleNet(num_classes=3)
load_weights(net, init_ckpt)
optimizer = ft.create_optimizer(net, %(lr)r)
step = ft.build_train_step(net, optimizer)
if precision == "bf16":
    # The kernels train with batch statistics only: each rank normalises its own half, as a
    # single process on that half does; dropout off.
    net.classifier.dropout = ms.nn.Identity()
else:
    net.set_train(False)  # BatchNorm uses (and keeps) its running statistics; dropout off
loss = step(ms.Tensor(x), ms.Tensor(y))
print(f"rank {rank}/{size} mode {mode} loss {float(loss.asnumpy()):.6f}", flush=True)
np.savez(out_file.replace("RANK", str(rank)), **{p.name: p.asnumpy() for p in net.get_parameters()})
''' % {"lr": LR}


def _env() -> dict:
    # msrun starts workers with the `python` on PATH: make it this interpreter.
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                GLOG_v="3", PYTHONPATH=str(ROOT))


def _msrun(log_dir: Path, *script_and_args, timeout: int = 600, threads: int = 0) -> subprocess.CompletedProcess:
    cmd = [str(MSRUN), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
           f"--log_dir={log_dir}", "--join=True", "--cluster_time_out=300", *map(str, script_and_args)]
    env = dict(_env(), OMP_NUM_THREADS=str(threads)) if threads else _env()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=log_dir.parent)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(log_dir.glob("worker_*.log")))
    assert proc.returncode == 0, f"msrun failed ({proc.returncode}):\n{proc.stderr[-2000:]}\n{logs}"
    return proc


def _worker_logs(log_dir: Path) -> dict:
    return {int(p.stem.split("_")[-1]): p.read_text() for p in log_dir.glob("worker_*.log")}


def _native_bf16() -> bool:
    from vehiclenet.model import cpu_kernels

    library = cpu_kernels.library_path()
    return library is not None and cpu_kernels.cpu_isa(library)[1]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.skipif(
    not _native_bf16(), reason="needs a CPU with native bf16 (AVX512-BF16 or AMX)"))])
def test_two_workers_average_gradients(tmp_path, precision):
    init_ckpt = write_published_layout(tmp_path / "init.ckpt", num_classes=3, steps=1)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "batch.npz", x=rng.standard_normal((4, 3, SIZE, SIZE)).astype(np.float32),
             y=np.array([0, 1, 2, 1], np.int32))
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    common = [init_ckpt, tmp_path / "batch.npz"]

    # bf16: workers and single-process halves on one thread each (see _check_bf16_average)
    _msrun(tmp_path / "logs", script, *common, tmp_path / "parallel_RANK.npz", "parallel", precision,
           threads=1 if precision == "bf16" else 0)
    if precision == "bf16":
        return _check_bf16_average(tmp_path, script, common, init_ckpt)
    for mode in ("union", "half"):
        proc = subprocess.run([sys.executable, str(script), *map(str, common), str(tmp_path / f"{mode}_RANK.npz"),
                               mode, precision], capture_output=True, text=True, timeout=600, env=_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
    logs = _worker_logs(tmp_path / "logs")
    assert "rank 0/2 mode parallel" in logs[0] and "rank 1/2 mode parallel" in logs[1]

    rank0, rank1 = np.load(tmp_path / "parallel_0.npz"), np.load(tmp_path / "parallel_1.npz")
    union, half = np.load(tmp_path / "union_0.npz"), np.load(tmp_path / "half_0.npz")
    trainable = [n for n in union.files if not n.endswith(("moving_mean", "moving_variance"))]
    assert len(union.files) == 273 and len(trainable) == 165  # every parameter of the network
    from vehiclenet.model.checkpoint import read_checkpoint

    init = {p: v.asnumpy() for p, v in read_checkpoint(init_ckpt).items() if p != "__training_state__"}
    changed = 0
    for name in union.files:
        np.testing.assert_allclose(rank0[name], rank1[name], atol=1e-6, rtol=0, err_msg=name)
        # Averaged halves = the whole batch up to summation order, which oneDNN's kernels change
        # with the batch size on some instruction sets (AVX2: up to 1.6 % of a step, amplified
        # through the ReLUs of random weights); one half alone is 40-80 % of a step away.
        step = np.abs(union[name] - init[name]).max()
        np.testing.assert_allclose(rank0[name], union[name], atol=max(1e-5, 0.05 * step), rtol=0, err_msg=name)
        changed += not np.allclose(half[name], union[name], atol=max(1e-4, 0.2 * step), rtol=0)
    # Moving statistics stayed frozen, and the step really moved weights differently than rank 0's half alone.
    np.testing.assert_array_equal(union["model.bn1.moving_mean"], init["model.bn1.moving_mean"])
    assert not np.allclose(union["classifier.classifier.weight"], init["classifier.classifier.weight"])
    assert changed >= 10, changed


def _check_bf16_average(tmp_path: Path, script: Path, common: list, init_ckpt: Path) -> None:
    """bf16 on the kernels (batch statistics): one momentum-SGD first step is linear in the
    gradient, so the ranks' averaged step equals the mean of single-process steps on each half.
    Workers and halves run on one thread each, so they sum alike: in bf16 the thread count changes
    oneDNN's float32 summation order, which moves some next-layer inputs across a bf16 rounding
    boundary, and random weights with two-image batch statistics amplify that (loss 1.54 on one
    thread, 1.72 on two, here)."""
    from vehiclenet.model.checkpoint import read_checkpoint

    for mode in ("half", "other_half"):
        proc = subprocess.run([sys.executable, str(script), *map(str, common), str(tmp_path / f"{mode}_RANK.npz"),
                               mode, "bf16"], capture_output=True, text=True, timeout=600,
                              env=dict(_env(), OMP_NUM_THREADS="1"))
        assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = np.load(tmp_path / "parallel_0.npz"), np.load(tmp_path / "parallel_1.npz")
    half, other = np.load(tmp_path / "half_0.npz"), np.load(tmp_path / "other_half_0.npz")
    init = {p: v.asnumpy() for p, v in read_checkpoint(init_ckpt).items() if p != "__training_state__"}
    trainable = [n for n in half.files if not n.endswith(("moving_mean", "moving_variance"))]
    assert len(trainable) == 165
    changed = 0
    for name in trainable:
        np.testing.assert_allclose(rank0[name], rank1[name], atol=1e-6, rtol=0, err_msg=name)
        mean = (half[name] + other[name]) / 2
        step = np.abs(mean - init[name]).max()
        np.testing.assert_allclose(rank0[name], mean, atol=max(1e-5, 0.05 * step), rtol=0, err_msg=name)
        changed += not np.allclose(half[name], mean, atol=max(1e-4, 0.2 * step), rtol=0)
    assert changed >= 10, changed  # one half alone is visibly elsewhere: the comparison can fail


@pytest.mark.slow
def test_finetune_cli_under_msrun_shards_data_and_rank0_writes(tmp_path):
    data = make_dataset(tmp_path / "data", n_ids=3, per_id=8, size=SIZE)  # 24 images: 12 per worker
    out = tmp_path / "out"
    cli = Path(sys.executable).parent / "vehiclenet"
    _msrun(tmp_path / "logs", cli, "finetune", "--data", data, "--out", out, "--epochs", 1, "--batch-size", 6,
           "--image-size", SIZE, "--no-pretrained", "--lr", 0.003, "--num-workers", 1)
    logs = _worker_logs(tmp_path / "logs")
    # 12 images per worker / batch 6 = 2 steps (a single process would take 4).
    assert "epoch 1/1: loss" in logs[0] and "step 2," in logs[0], logs[0][-3000:]
    assert "3 identities" in logs[0] and "2 workers" in logs[0]
    assert "data-parallel: rank 1 of 2" in logs[1] and "epoch 1/1" not in logs[1] and "saved" not in logs[1]
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "vehiclenet-e001.ckpt"]
    from vehiclenet.model.checkpoint import load_weights
    from vehiclenet.model.network import VehicleNet

    report = load_weights(VehicleNet(num_classes=3), out / "vehiclenet-e001.ckpt")
    assert not report.reinitialized and "step_num" in report.training_state
