"""Hostile inputs, round 2 (issue 29, items 1-4): outputs aimed at an input folder's own files,
concurrent writers, and chunks of another job, through the real CLI in subprocesses.

Concurrency cases start real processes together, >= 10 trials each, and assert that every
write a process reported survives, or that the loser was refused with a named error.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

from support.features import chunk_folder
from support.http_server import subprocess_env

TRIALS = 10


def cli(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env(GLOG_v="3", VEHICLENET_HOME=str(cwd / "home")))


def together(*argvs: List, cwd: Path) -> List[subprocess.CompletedProcess]:
    """Start every command at once, then wait for all: their critical sections overlap."""
    env = subprocess_env(GLOG_v="3", VEHICLENET_HOME=str(cwd / "home"))
    procs = [subprocess.Popen([sys.executable, "-m", "vehiclenet", *map(str, a)], cwd=cwd, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for a in argvs]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return done


def snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- item 1


@pytest.mark.parametrize("target", ["manifest.json", "chunk-00000.npz", "chunk-00001.npz.sha256", "new.npz"])
def test_outputs_inside_an_input_chunk_folder_are_refused(tmp_path, target):
    folder = chunk_folder(tmp_path / "feats")
    before = snapshot(folder)
    runs = {
        "embed-merge": ["embed-merge", folder, "--out", folder / target],
        "embed --out-dir": ["embed", tmp_path / "imgs", "--out-dir", folder, "--out", folder / target,
                            "--no-pretrained"],
        "index build": ["index", "build", folder, "--out", folder / target],
        # through a link to the folder: the same place
        "embed-merge via link": ["embed-merge", folder, "--out", tmp_path / "link" / target],
    }
    (tmp_path / "imgs").mkdir()
    (tmp_path / "link").symlink_to(folder)
    for what, argv in runs.items():
        proc = cli(*argv, cwd=tmp_path)
        assert proc.returncode == 2, (what, proc.stderr)
        assert "inside the input folder" in proc.stderr and str(folder) in proc.stderr, (what, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert snapshot(folder) == before, what
    # A plain folder of .npz files (no manifest) stands for its .npz files only: an index may go there.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(tmp_path / "feats" / "chunk-00000.npz", plain / "a.npz")  # any .npz with features and paths
    proc = cli("index", "build", plain, "--out", plain / "g.index", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Beside the folder is fine, and the merge is what the chunks hold.
    proc = cli("embed-merge", folder, "--out", tmp_path / "merged.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "merged.npz")["paths"].tolist() == [f"img{i}.jpg" for i in range(4)]


# --------------------------------------------------------------------------- item 2


@pytest.mark.slow
def test_concurrent_index_adds_keep_every_addition(tmp_path):
    from vehiclenet.embedding.result import save_features
    from vehiclenet.retrieval.index import load_index

    rng = np.random.default_rng(0)

    def features(name: str, prefix: str, n: int) -> Path:
        feats = rng.standard_normal((n, 16)).astype(np.float32)
        feats /= np.linalg.norm(feats, axis=1, keepdims=True)
        return save_features(tmp_path / name, feats, [f"{prefix}{i}.jpg" for i in range(n)])

    features("base.npz", "base", 50)
    for trial in range(TRIALS):
        index = tmp_path / f"g{trial}.index"
        assert cli("index", "build", "base.npz", "--out", index, cwd=tmp_path).returncode == 0
        a = features(f"a{trial}.npz", f"a{trial}-", 30)
        b = features(f"b{trial}.npz", f"b{trial}-", 40)
        runs = together(["index", "add", index, a], ["index", "add", index, b], cwd=tmp_path)
        for proc in runs:
            assert proc.returncode == 0, proc.stderr
            assert "added" in proc.stdout
        held = load_index(index)
        names = {held.path(r) for r in range(held.count)}
        assert held.count == 120 and len(names) == 120, f"trial {trial}: {held.count} rows"
        assert {f"a{trial}-0.jpg", f"b{trial}-39.jpg", "base49.jpg"} <= names
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".g{trial}.index")], "temporary files left"


# --------------------------------------------------------------------------- items 3 and 4: embed --out-dir


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-writers")
    (root / "imgs").mkdir()
    rng = np.random.default_rng(3)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(root / "imgs" / f"{i}.png")
    return root


def _embed_chunks(out_dir: Path, seed: int, *more) -> list:
    return ["embed", "imgs", "--out-dir", out_dir, "--chunk-size", 1, "--no-pretrained", "--seed", seed,
            "--no-flip", "--image-size", 32, "--json", *more]


@pytest.mark.slow
def test_two_jobs_starting_together_in_one_folder_one_is_refused(images):
    for trial in range(TRIALS):
        folder = images / f"race{trial}"
        runs = together(_embed_chunks(folder, 0), _embed_chunks(folder, 1), cwd=images)
        codes = sorted(p.returncode for p in runs)
        assert codes == [0, 2], [(p.returncode, p.stderr[-500:]) for p in runs]
        winner, loser = (runs[0], runs[1]) if runs[0].returncode == 0 else (runs[1], runs[0])
        assert "holds the chunks of another job" in loser.stderr and "seed" in loser.stderr, loser.stderr
        assert loser.stdout == ""
        recorded = json.loads((folder / "manifest.json").read_text())["job"]["weights"]
        assert json.loads(winner.stdout)["weights"] == recorded
        merged = cli("embed-merge", folder, "--out", images / f"race{trial}.npz", cwd=images)
        assert merged.returncode == 0, merged.stderr


@pytest.mark.slow
def test_a_chunk_of_another_job_or_a_linked_chunk_is_never_taken(images, tmp_path):
    ours, theirs = images / "ours", images / "theirs"
    for folder, seed in ((ours, 0), (theirs, 1)):
        proc = cli(*_embed_chunks(folder, seed, "--out", f"{folder.name}.npz"), cwd=images)
        assert proc.returncode == 0, proc.stderr
    reference = np.load(images / "ours.npz")["features"]
    for suffix in ("", ".sha256"):  # copied with its checksum line: sha256 matches, job does not
        shutil.copy(theirs / f"chunk-00000.npz{suffix}", ours / f"chunk-00000.npz{suffix}")
        (ours / f"chunk-00001.npz{suffix}").unlink()
        os.symlink(theirs / f"chunk-00001.npz{suffix}", ours / f"chunk-00001.npz{suffix}")

    merged = cli("embed-merge", ours, "--out", tmp_path / "m.npz", cwd=images)
    assert merged.returncode == 1 and "chunk-00000.npz: a chunk of another job" in merged.stderr, merged.stderr
    assert not (tmp_path / "m.npz").exists()
    resumed = cli(*_embed_chunks(ours, 0, "--out", "again.npz"), "-v", cwd=images)
    assert resumed.returncode == 0, resumed.stderr
    assert "chunk-00000.npz failed verification (a chunk of another job" in resumed.stderr, resumed.stderr
    assert "chunk-00001.npz.sha256: unusable checksum line (not a regular file, but a symbolic link" \
        in resumed.stderr, resumed.stderr
    assert json.loads(resumed.stdout)["embedded"] == [0, 1]
    assert not (ours / "chunk-00001.npz").is_symlink() and (theirs / "chunk-00001.npz").is_file()
    np.testing.assert_array_equal(np.load(images / "again.npz")["features"], reference)


def test_a_linked_chunk_is_refused_by_merge(tmp_path):
    ours = chunk_folder(tmp_path / "ours")
    moved = tmp_path / "elsewhere.npz"
    os.replace(ours / "chunk-00001.npz", moved)
    os.symlink(moved, ours / "chunk-00001.npz")  # same bytes, same job: still not a file the job wrote here
    proc = cli("embed-merge", ours, "--out", tmp_path / "m.npz", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "chunk-00001.npz: unreadable (not a regular file, but a symbolic link" in proc.stderr, proc.stderr
    assert not (tmp_path / "m.npz").exists()


def test_a_folder_of_the_previous_format_is_still_read_and_resumed(tmp_path):
    """Format 1 folders (chunks without their job's digest) are merged and resumed as before;
    in a format 2 folder such a chunk is redone."""
    import io

    folder = chunk_folder(tmp_path / "old")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1}))
    for index in range(2):  # the chunks as format 1 wrote them: no "job" array
        name = f"chunk-{index:05d}.npz"
        with np.load(folder / name) as npz:
            arrays = {k: npz[k] for k in npz.files if k != "job"}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        (folder / name).write_bytes(buffer.getvalue())
        (folder / f"{name}.sha256").write_text(f"{hashlib.sha256(buffer.getvalue()).hexdigest()}  {name}\n")
    proc = cli("embed-merge", folder, "--out", tmp_path / "m.npz", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert np.load(tmp_path / "m.npz")["paths"].tolist() == [f"img{i}.jpg" for i in range(4)]
    (folder / "manifest.json").write_text(json.dumps(manifest))  # the same chunks in a format 2 folder
    proc = cli("embed-merge", folder, "--out", tmp_path / "m2.npz", cwd=tmp_path)
    assert proc.returncode == 1 and "chunk-00000.npz: a chunk without its job's sha256" in proc.stderr, proc.stderr
