"""`vehiclenet embed --out-dir`: chunked, resumable, data-parallel under real msrun workers.

One single-process `vehiclenet embed --out` run of 40 generated images is the reference.
Then real msrun jobs (two CPU workers) write chunk folders: the merged features equal the
reference (same paths, same order, <= 1e-6); a job interrupted half way (Ctrl-C to msrun, which
SIGKILLs its workers) is finished
by a re-run that leaves the finished chunk files untouched and embeds only the rest (counted
from the workers' logs); a damaged chunk is redone; another job into the same folder is
refused before the network is built. Images are 40 tiny PNGs (the network still sees 384x384)
embedded without flip, 4 per chunk: 10 chunks, 5 per worker.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from support.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
MSRUN = Path(sys.executable).parent / "msrun"
CLI = Path(sys.executable).parent / "vehiclenet"
N_IMAGES, CHUNK = 40, 4
CHUNKS = N_IMAGES // CHUNK


@pytest.fixture(scope="module")
def work(tmp_path_factory, small_ckpt) -> dict:
    """Images, the session's random checkpoint, a cache shared by the module's runs (one graph
    compile), and the single-process reference features."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):  # two folders, so that the sorted walk's order matters
        folder = root / "imgs" / ("front" if i % 2 else "rear")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    ckpt = small_ckpt
    w = {"root": root, "imgs": root / "imgs", "ckpt": ckpt, "home": root / "home"}
    proc = _cli(w, "embed", w["imgs"], "--out", root / "ref.npz", "--checkpoint", ckpt, "--no-flip")
    assert proc.returncode == 0, proc.stderr[-3000:]
    w["ref"] = np.load(root / "ref.npz")
    assert w["ref"]["features"].shape == (N_IMAGES, 512)
    return w


def _env(w: dict, **extra: str) -> dict:
    # msrun starts workers with the `python` on PATH: make it this interpreter.
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                GLOG_v="3", PYTHONPATH=str(ROOT), VEHICLENET_HOME=str(w["home"]), **extra)


def _cli(w: dict, *args, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, timeout=600,
                          env=_env(w, **extra), cwd=w["root"])


def _msrun_cmd(log_dir: Path, *args) -> list:
    return [str(MSRUN), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
            f"--log_dir={log_dir}", "--join=True", "--cluster_time_out=300", str(CLI), *map(str, args)]


def _embed_args(w: dict, out_dir: Path, *more) -> list:
    return ["embed", w["imgs"], "--out-dir", out_dir, "--chunk-size", CHUNK, "--checkpoint", w["ckpt"],
            "--no-flip", *more]


def _msrun(w: dict, log_dir: Path, *args) -> dict:
    """Run a msrun job to its end; the workers' logs by rank."""
    proc = subprocess.run(_msrun_cmd(log_dir, *args), capture_output=True, text=True, timeout=600, env=_env(w),
                          cwd=w["root"])
    logs = _worker_logs(log_dir)
    assert proc.returncode == 0, f"msrun failed ({proc.returncode}):\n{proc.stderr[-2000:]}\n{logs}"
    return logs


def _worker_logs(log_dir: Path) -> dict:
    return {int(p.stem.split("_")[-1]): p.read_text() for p in log_dir.glob("worker_*.log")}


def _embedded(log: str) -> list:
    """The chunks a worker's log says it put through the network."""
    return [int(i) for i in re.findall(r"embedded chunk (\d+) ", log)]


def _stats(folder: Path) -> dict:
    """(inode, mtime_ns) of every chunk file: a rewritten file gets a new inode (atomic rename)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("chunk-*")}


def _assert_equals_reference(w: dict, features_file: Path) -> None:
    merged, ref = np.load(features_file), w["ref"]
    assert merged["paths"].tolist() == ref["paths"].tolist()
    np.testing.assert_allclose(merged["features"], ref["features"], atol=1e-6, rtol=0)
    assert merged["flip"] == ref["flip"] == np.asarray(False)


@pytest.fixture(scope="module")
def finished(work) -> dict:
    """A clean msrun job of two workers: its chunk folder, logs and merged file."""
    out_dir, merged = work["root"] / "feats", work["root"] / "merged.npz"
    logs = _msrun(work, work["root"] / "logs", *_embed_args(work, out_dir, "--out", merged))
    return {"dir": out_dir, "merged": merged, "logs": logs, "logs_dir": work["root"] / "logs"}


@pytest.mark.slow
def test_msrun_two_workers_give_the_single_process_features(work, finished):
    logs = finished["logs"]
    # Round robin: chunk c on rank c % 2, each worker its 5 chunks, nothing done twice.
    assert _embedded(logs[0]) == [0, 2, 4, 6, 8] and _embedded(logs[1]) == [1, 3, 5, 7, 9], logs
    assert "rank 0 of 2: 10 chunk(s) of 40 image(s) in all, 5 for this rank: 0 chunks already done" in logs[0]
    # msrun runs the command once more as its scheduler: that one must not embed anything.
    scheduler = (finished["logs_dir"] / "scheduler.log").read_text()
    assert "msrun's scheduler process: the workers embed" in scheduler and "embedded chunk" not in scheduler
    assert sorted(p.name for p in finished["dir"].iterdir()) == sorted(
        ["manifest.json"] + [f"chunk-{i:05d}.npz{s}" for i in range(CHUNKS) for s in ("", ".sha256")])
    # The worker that finished last merged (both may, when they finish together: same bytes).
    assert any("merged 40 image(s)" in log for log in logs.values()), logs
    _assert_equals_reference(work, finished["merged"])

    from vehiclenet.embedding.files import load_features

    res = load_features(finished["dir"])  # a chunk folder reads as one FeatureResult too
    assert res.paths == work["ref"]["paths"].tolist() and not res.skipped
    np.testing.assert_allclose(res.features, work["ref"]["features"], atol=1e-6, rtol=0)


def _two_machines(w: dict, tmp_path: Path, node_ranks, *args) -> list:
    """msrun as on two machines (one worker each, the first one's address as master): two
    msrun processes at once, here both on this host; their return codes."""
    port = free_port()
    procs = []
    for machine, node_rank in enumerate(node_ranks):
        cmd = [str(MSRUN), "--worker_num=2", "--local_worker_num=1", "--master_addr=127.0.0.1",
               f"--master_port={port}", f"--log_dir={tmp_path / f'logs{machine}'}", "--join=True",
               "--cluster_time_out=300", *([f"--node_rank={node_rank}"] if node_rank is not None else []),
               str(CLI), *map(str, args)]
        procs.append(subprocess.Popen(cmd, env=_env(w), cwd=w["root"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
    return [p.wait(timeout=600) for p in procs]


def test_two_machines_with_node_rank_share_the_chunks(work, tmp_path):
    out_dir, merged = tmp_path / "feats", tmp_path / "merged.npz"
    assert _two_machines(work, tmp_path, (0, 1), *_embed_args(work, out_dir, "--out", merged)) == [0, 0]
    logs = {**_worker_logs(tmp_path / "logs0"), **_worker_logs(tmp_path / "logs1")}
    assert _embedded(logs[0]) == [0, 2, 4, 6, 8] and _embedded(logs[1]) == [1, 3, 5, 7, 9], logs
    _assert_equals_reference(work, merged)


def test_two_machines_without_node_rank_are_refused(work, tmp_path):
    # msrun cannot tell a worker its rank then (it gets one inside init(), which embed never calls).
    codes = _two_machines(work, tmp_path, (None, None), *_embed_args(work, tmp_path / "feats"))
    assert codes == [1, 1]
    logs = {**_worker_logs(tmp_path / "logs0"), **_worker_logs(tmp_path / "logs1")}
    assert all("give msrun --node_rank=<machine index>" in log for log in logs.values()), logs
    assert not (tmp_path / "feats").exists()


@pytest.mark.slow
def test_killed_msrun_job_resumes_without_redoing_finished_chunks(work, tmp_path):
    out_dir = tmp_path / "feats"
    proc = subprocess.Popen(_msrun_cmd(tmp_path / "logs1", *_embed_args(work, out_dir)), env=_env(work),
                            cwd=work["root"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(list(out_dir.glob("chunk-*.sha256"))) < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, "msrun ended before it could be killed"
            time.sleep(0.02)
        family = psutil.Process(proc.pid).children(recursive=True)
    finally:
        # Ctrl-C at the terminal: SIGINT to msrun's process group. msrun started each worker in a
        # session of its own (setsid), so the signal reaches msrun, which SIGKILLs every worker.
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    gone, alive = psutil.wait_procs(family, timeout=30)
    for survivor in alive:  # ours: started by this test's msrun
        survivor.kill()
    assert not alive, f"workers survived the kill: {alive}"
    first = _worker_logs(tmp_path / "logs1")
    assert "rank 0 of 2" in first[0] and "rank 1 of 2" in first[1]  # both workers were at work
    done = sorted(int(p.name[6:11]) for p in out_dir.glob("chunk-*.npz.sha256"))
    assert 3 <= len(done) < CHUNKS, done  # killed half way: some chunks finished, not all
    before = {name: st for name, st in _stats(out_dir).items() if int(name[6:11]) in done}

    logs = _msrun(work, tmp_path / "logs2", *_embed_args(work, out_dir, "--out", tmp_path / "merged.npz"))
    after = _stats(out_dir)
    assert {name: after[name] for name in before} == before  # the finished chunks were not rewritten
    redone = sorted(_embedded(logs[0]) + _embedded(logs[1]))
    assert redone == sorted(set(range(CHUNKS)) - set(done)), (done, logs)  # network calls: the rest only
    verified = sum(int(m) for log in logs.values() for m in re.findall(r"(\d+) chunks already done, verified", log))
    assert verified == len(done)
    assert not [p.name for p in out_dir.iterdir() if p.name.startswith(".")]  # the kill's temporary files went
    _assert_equals_reference(work, tmp_path / "merged.npz")


def test_damaged_chunks_are_redone_and_merge_refuses_them(work, finished, tmp_path):
    out_dir = tmp_path / "feats"
    shutil.copytree(finished["dir"], out_dir)
    flipped = out_dir / "chunk-00003.npz"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one byte of the features
    flipped.write_bytes(bytes(data))
    truncated = out_dir / "chunk-00006.npz"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    (out_dir / "chunk-00008.npz.sha256").unlink()  # a chunk whose run died before its sha256 line
    before = _stats(out_dir)

    merge = _cli(work, "embed-merge", out_dir, "--out", tmp_path / "merged.npz")
    assert merge.returncode == 1 and "chunk-00008.npz" in merge.stderr and "run the same" in merge.stderr, merge.stderr
    from vehiclenet.errors import DataError
    from vehiclenet.embedding.shards import load_feature_shards

    (out_dir / "chunk-00008.npz.sha256").write_text((finished["dir"] / "chunk-00008.npz.sha256").read_text())
    with pytest.raises(DataError, match=r"chunk-00003.npz: sha256 \S+ is not the recorded"):
        load_feature_shards(out_dir)
    (out_dir / "chunk-00008.npz.sha256").unlink()

    proc = _cli(work, *_embed_args(work, out_dir, "--out", tmp_path / "merged.npz"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _embedded(proc.stderr) == [3, 6, 8]
    assert "chunk-00003.npz failed verification (sha256" in proc.stderr
    assert "chunk-00006.npz failed verification" in proc.stderr
    assert "7 chunks already done, verified; 3 to embed" in proc.stderr
    after = _stats(out_dir)
    assert {n: after[n] for n in before if n[6:11] not in ("00003", "00006", "00008")} == \
        {n: st for n, st in before.items() if n[6:11] not in ("00003", "00006", "00008")}
    _assert_equals_reference(work, tmp_path / "merged.npz")
    merge = _cli(work, "embed-merge", out_dir, "--out", tmp_path / "again.npz")
    assert merge.returncode == 0, merge.stderr
    _assert_equals_reference(work, tmp_path / "again.npz")


@pytest.mark.parametrize("what", ["flip", "chunk_size"])
def test_another_job_into_the_same_folder_is_refused(work, finished, what):
    args = _embed_args(work, finished["dir"])
    if what == "flip":
        args.remove("--no-flip")
        named = "flip False there, True now (--no-flip)"
    else:
        args[args.index("--chunk-size") + 1] = 5
        named = "chunk_size 4 there, 5 now (--chunk-size)"
    before = _stats(finished["dir"])
    script = ("import sys\nfrom vehiclenet.cli import main\n"
              f"rc = main({[str(a) for a in args]!r})\nprint('RC', rc, 'MS', 'mindspore' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=_env(work), cwd=work["root"])
    assert proc.stdout.strip().splitlines()[-1] == "RC 2 MS False"  # refused before MindSpore was even loaded
    assert named in proc.stderr and "give another --out-dir, or delete that folder" in proc.stderr, proc.stderr
    assert _stats(finished["dir"]) == before


def test_folders_and_launchers_that_cannot_work_are_refused(work, tmp_path):
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    proc = _cli(work, *_embed_args(work, stray))
    assert proc.returncode == 2 and "holds files but no manifest.json" in proc.stderr, proc.stderr
    proc = _cli(work, "embed", work["imgs"], "--out-dir", tmp_path / "r", "--no-pretrained", "--seed", "-1")
    assert proc.returncode == 2 and "--seed must be in [0, 2**32), got -1" in proc.stderr, proc.stderr
    # A worker of msrun: plain --out would have every worker embed everything.
    proc = _cli(work, "embed", work["imgs"], "--out", tmp_path / "f.npz", "--checkpoint", work["ckpt"],
                MS_ROLE="MS_WORKER", MS_NODE_ID="1", MS_WORKER_NUM="2")
    assert proc.returncode == 2 and "give --out-dir DIR" in proc.stderr, proc.stderr
    proc = _cli(work, *_embed_args(work, tmp_path / "r"), MS_ROLE="MS_WORKER", MS_WORKER_NUM="4", RANK_ID="0")
    assert proc.returncode == 2 and "--node_rank" in proc.stderr, proc.stderr
    proc = _cli(work, "embed", work["imgs"], "--out", tmp_path / "f.npz", "--chunk-size", 5)
    assert proc.returncode == 2 and "--chunk-size is for --out-dir" in proc.stderr, proc.stderr
    assert not (tmp_path / "r").exists() and not (tmp_path / "f.npz").exists()


def test_launcher_rank_reads_msrun_variables_only_in_msrun_workers(monkeypatch):
    from vehiclenet.env import launcher_rank, msrun_scheduler
    from vehiclenet.errors import UsageError

    for name in ("MS_ROLE", "MS_NODE_ID", "MS_WORKER_NUM", "RANK_ID", "RANK_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MS_NODE_ID", "3")
    monkeypatch.setenv("MS_WORKER_NUM", "8")  # left in a shell by another job: not a worker of msrun
    assert launcher_rank() == (0, 1) and not msrun_scheduler()
    monkeypatch.setenv("MS_ROLE", "MS_WORKER")
    assert launcher_rank() == (3, 8)
    monkeypatch.setenv("MS_NODE_ID", "8")
    with pytest.raises(UsageError, match="MS_NODE_ID=8 is not below MS_WORKER_NUM=8"):
        launcher_rank()
    # Several machines without --node_rank: msrun exports RANK_ID=0 (its scheduler's) to every
    # worker of the first machine, but no MS_NODE_ID; the rank is not known.
    monkeypatch.delenv("MS_NODE_ID")
    monkeypatch.setenv("RANK_ID", "0")
    with pytest.raises(UsageError, match="--node_rank"):
        launcher_rank()
    monkeypatch.setenv("MS_ROLE", "MS_SCHED")
    assert msrun_scheduler() and launcher_rank() == (0, 1)


def test_skip_bad_chunks_keep_the_single_process_rows_and_list_what_was_skipped(work, tmp_path):
    """--skip-bad: chunk 1 of 2 images holds only corrupt files (embed raises there; the chunk
    records both as skipped), chunk 2 one of two. Rows and paths equal one process's."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(6):
        if i in (2, 3, 5):
            (imgs / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
        else:
            shutil.copy(sorted(work["imgs"].rglob("*.png"))[i], imgs / f"{i}.png")
    common = ["--checkpoint", work["ckpt"], "--no-flip", "--skip-bad"]
    proc = _cli(work, "embed", imgs, "--out", tmp_path / "ref.npz", *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _cli(work, "embed", imgs, "--out-dir", tmp_path / "feats", "--chunk-size", 2, *common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _embedded(proc.stderr) == [0, 1, 2]

    from vehiclenet.embedding.files import load_features

    ref, res = np.load(tmp_path / "ref.npz"), load_features(tmp_path / "feats")
    assert res.paths == ref["paths"].tolist() == [str(imgs / f"{i}.png") for i in (0, 1, 4)]
    np.testing.assert_allclose(res.features, ref["features"], atol=1e-6, rtol=0)
    assert [p for p, _ in res.skipped] == [str(imgs / f"{i}.png") for i in (2, 3, 5)]
    assert {reason for _, reason in res.skipped} == {"not an image file (Pillow cannot identify it)"}


def test_a_killed_runs_leftover_behind_a_finished_chunk_is_cleared(tmp_path):
    """A kill between publishing a chunk's .sha256 and removing its temporary folder leaves the
    folder behind a finished chunk, which no later write clears: planning the next run does,
    for dead processes only (a worker running beside it keeps its own)."""
    import socket

    from vehiclenet.embedding import shards
    from vehiclenet.embedding.result import FeatureResult

    paths = [f"img{i}.jpg" for i in range(4)]
    job = shards.ShardJob(images=4, inputs_sha256=shards.inputs_digest(paths), chunk_size=2, weights="sha256:00",
                          flip=False, precision="fp32", image_size=(384, 384), skip_bad=False, version="0")
    folder = tmp_path / "feats"
    shards.prepare_folder(folder, job)
    for index in range(job.chunks):
        a, b = job.chunk_range(index)
        shards._write_chunk(folder, job, index, paths[a:b],
                            FeatureResult(np.full((b - a, 8), 8 ** -0.5, np.float32), paths[a:b]))
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = folder / f".chunk-00000.npz.sha256.{dead}@{host}.0123456789ab.partial"
    live = folder / f".chunk-00001.npz.sha256.{os.getpid()}@{host}.0123456789ab.partial"
    stale.mkdir()
    live.mkdir()
    plan = shards.plan_shards(folder, job, paths)
    assert plan.done == [0, 1] and not plan.todo
    assert not stale.exists() and live.exists()
