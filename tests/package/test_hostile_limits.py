"""Hostile inputs, round 2 (issue 29, items 7, 8, 9 and 12): FIFOs and devices where files are
read, sizes from files and arguments that would loop or allocate without bound, conditions that
ended in a traceback, and messages that misled, through the real CLI in subprocesses.

FIFO cases run under a subprocess timeout: a regression fails instead of hanging the run.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from support.http_server import subprocess_env
from support.features import chunk_folder

TIMEOUT = 60


def cli(*args, cwd: Path, timeout: float = TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout,
                          env=subprocess_env(**{"GLOG_v": "3", "VEHICLENET_HOME": str(cwd / "home"), **env}))


def one_error(proc: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """Exit ``code``, one line on stderr holding every one of ``words``, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


def unit_features(path: Path, n: int = 4, d: int = 8) -> Path:
    from vehiclenet.embedding.result import save_features

    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    return save_features(path, x / np.linalg.norm(x, axis=1, keepdims=True), [f"g{i}.jpg" for i in range(n)])


# --------------------------------------------------------------------------- item 7


def test_fifos_where_files_are_read_are_named_not_waited_on(tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    unit_features(tmp_path / "good.npz")
    assert cli("index", "build", "good.npz", "--out", "good.index", cwd=tmp_path).returncode == 0
    runs = [("search", "--index", "good.index", "--features", fifo), ("index", "build", fifo, "--out", "x.index"),
            ("index", "add", "good.index", fifo), ("evaluate", "--features", fifo)]
    for argv in runs:
        one_error(cli(*argv, cwd=tmp_path), 1, str(fifo), "FIFO")
    one_error(cli("search", "--index", fifo, "--features", "good.npz", cwd=tmp_path), 1, str(fifo),
              "a FIFO (named pipe), not a gallery index file")
    one_error(cli("verify", cwd=tmp_path, VEHICLENET_ASSETS=str(fifo)), 2, str(fifo), "FIFO")


@pytest.mark.slow
def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(folder / "a.png")
    os.mkfifo(folder / "b.jpg")
    proc = cli("embed", folder, "--out", "f.npz", "--no-pretrained", "--image-size", 32, cwd=tmp_path, timeout=300)
    one_error(proc, 1, f"{folder / 'b.jpg'}: a FIFO (named pipe), not an image file")
    proc = cli("embed", folder, "--out", "f.npz", "--no-pretrained", "--image-size", 32, "--skip-bad",
               cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "skipped 1" in proc.stdout, proc.stderr[-2000:]


# --------------------------------------------------------------------------- item 8


def test_sizes_from_files_are_bounded_before_anything_is_allocated(tmp_path):
    one_error(cli("verify", cwd=tmp_path, VEHICLENET_ASSETS="/dev/zero"), 2, "/dev/zero", "a character device")
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:  # 512 MiB of zeros in ~0.5 MB
        with zf.open("features.npy", "w", force_zip64=True) as member:
            header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 512), np.float32))
            header["shape"] = (1 << 18, 512)
            np.lib.format.write_array_header_1_0(member, header)
            zeros = bytes(1 << 20)
            for _ in range(512):
                member.write(zeros)
        zf.writestr("paths.npy", b"")
    lying = tmp_path / "lying.npz"  # a header claiming 2 GiB over 128 stored bytes
    with zipfile.ZipFile(lying, "w") as zf:
        with zf.open("features.npy", "w") as member:
            header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 512), np.float32))
            header["shape"] = (1 << 20, 512)
            np.lib.format.write_array_header_1_0(member, header)
            member.write(bytes(128))
    for path, words in ((bomb, "would inflate from"), (lying, "declares shape (1048576, 512)")):
        proc = cli("index", "build", path, "--out", "x.index", cwd=tmp_path)
        one_error(proc, 1, str(path), words)

    folder = chunk_folder(tmp_path / "chunks")
    manifest = json.loads((folder / "manifest.json").read_text())
    for field, value in (("images", 10 ** 12), ("images", 1e12), ("chunk_size", 0), ("image_size", "ab")):
        (folder / "manifest.json").write_text(json.dumps({**manifest, "job": {**manifest["job"], field: value}}))
        one_error(cli("embed-merge", folder, "--out", "m.npz", cwd=tmp_path), 1, "unreadable manifest",
                  f"job field {field} is {value!r}")
    (folder / "manifest.json").write_text("[" * 200000 + "]" * 200000)
    one_error(cli("embed-merge", folder, "--out", "m.npz", cwd=tmp_path), 1, "unreadable manifest")
    assert not (tmp_path / "m.npz").exists()


def test_sizes_from_arguments_are_bounded(tmp_path):
    from vehiclenet.datasets.vehicleid import VehicleIDFeatures, save_vehicleid_features

    feats = np.eye(6, 8, dtype=np.float32)
    save_vehicleid_features(tmp_path / "vid.npz", VehicleIDFeatures(feats, np.array([0, 0, 1, 1, 2, 2]), None, None))
    one_error(cli("evaluate", "--features", "vid.npz", "--dataset", "vehicleid", "--trials", 10 ** 8, cwd=tmp_path),
              2, "--trials must be from 1 to 1000")
    one_error(cli("rank", "--query", "q.png", "--gallery", "g", "--thumb", 100000, cwd=tmp_path), 2,
              "--thumb must be from 16 to 1024")
    one_error(cli("export", "--format", "ONNX", "--out", "big.onnx", "--no-pretrained", "--image-size", 10 ** 6,
                  cwd=tmp_path), 2, "--image-size must be in [32, 2048]")
    one_error(cli("download", cwd=tmp_path, VEHICLENET_RETRIES="1000"), 2, "VEHICLENET_RETRIES='1000' must be at most 100")
    proc = cli("evaluate", "--features", "vid.npz", "--dataset", "vehicleid", "--trials", 3, cwd=tmp_path)
    assert proc.returncode == 0 and "3 trial(s)" in proc.stdout, proc.stderr


# --------------------------------------------------------------------------- item 9


def test_conditions_that_ended_in_a_traceback_are_named(tmp_path):
    from vehiclenet.embedding import shards
    from vehiclenet.datasets.vehicleid import VehicleIDFeatures, save_vehicleid_features
    from vehiclenet.embedding.result import FeatureResult

    gone = tmp_path / "gone"
    gone.mkdir()
    proc = subprocess.run(f"cd {gone} && rmdir {gone} && exec {sys.executable} -m vehiclenet embed {tmp_path} "
                          f"--out {tmp_path / 'f.npz'} --no-pretrained", shell=True, capture_output=True, text=True,
                          timeout=TIMEOUT, env=subprocess_env())
    one_error(proc, 2, "the working folder no longer exists")

    folder = chunk_folder(tmp_path / "chunks")
    (folder / "chunk-00000.npz.sha256").write_bytes(b"\xff\xfe zz\n")
    one_error(cli("embed-merge", folder, "--out", "m.npz", cwd=tmp_path), 1,
              "chunk-00000.npz.sha256: unusable checksum line")

    mixed = chunk_folder(tmp_path / "mixed", dim=16)  # a chunk of 8-d rows among 16-d ones, job and hashes right
    job = shards._read_manifest(mixed)
    narrow = np.eye(2, 8, dtype=np.float32)
    shards._write_chunk(mixed, job, 1, ["img2.jpg", "img3.jpg"], FeatureResult(narrow, ["img2.jpg", "img3.jpg"]))
    for argv in (("embed-merge", mixed, "--out", "m.npz"), ("index", "build", mixed, "--out", "m.index")):
        one_error(cli(*argv, cwd=tmp_path), 1, "chunk-00001.npz: 8-d features, the chunks before it hold 16-d")

    for name, ids, words in (("single", [0, 1, 2, 3], "no identity has two images"),
                             ("negative", [-1] * 4, "ids hold 4 negative value(s)")):
        save_vehicleid_features(tmp_path / f"{name}.npz",
                                VehicleIDFeatures(np.eye(4, 8, dtype=np.float32), np.array(ids), None, None))
        one_error(cli("evaluate", "--features", f"{name}.npz", "--dataset", "vehicleid", cwd=tmp_path), 1,
                  f"{name}.npz", words)


# --------------------------------------------------------------------------- item 12


def test_output_that_cannot_be_delivered_is_not_reported_as_delivered(tmp_path):
    unit_features(tmp_path / "g.npz", n=64)
    unit_features(tmp_path / "q.npz", n=600)
    assert cli("index", "build", "g.npz", "--out", "g.index", cwd=tmp_path).returncode == 0
    argv = [sys.executable, "-m", "vehiclenet", "search", "--index", "g.index", "--features", "q.npz",
            "--keep-self"]
    env = subprocess_env(VEHICLENET_HOME=str(tmp_path / "home"))
    # A reader that stops after one line (| head -1): ~200 KB of results do not fit the pipe.
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"query g0.jpg")
    proc.stdout.close()
    assert proc.wait(timeout=TIMEOUT) == 141 and proc.stderr.read() == b""
    proc.stderr.close()
    # Standard output closed (>&-): the results would be lost.
    closed = subprocess.run(" ".join(map(str, argv)) + " >&-", shell=True, cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT)
    one_error(closed, 2, "standard output is closed")


def test_bad_settings_are_reported_before_any_work(tmp_path):
    folder = chunk_folder(tmp_path / "chunks")
    for name, value in (("VEHICLENET_COMPILE_CACHE", "maybe"), ("VEHICLENET_CPU_KERNELS", "maybe"),
                        ("VEHICLENET_MAX_PIXELS", "abc")):
        one_error(cli("embed-merge", folder, "--out", "m.npz", cwd=tmp_path, **{name: value}), 2, f"{name}=")
        assert not (tmp_path / "m.npz").exists()
    proc = cli("info", cwd=tmp_path, VEHICLENET_HOME=str(tmp_path / "h\nforged: line"))
    assert proc.returncode == 0, proc.stderr
    assert not any(line.startswith("forged") for line in proc.stdout.splitlines())
    assert "h\\nforged: line (VEHICLENET_HOME)" in proc.stdout


def test_a_failed_write_and_an_unlistable_folder_are_named(tmp_path):
    unit_features(tmp_path / "g.npz", n=64)
    # A write past the file size limit fails as a full disk does: an OSError without a file name.
    proc = subprocess.run(f"ulimit -f 4 && exec {sys.executable} -m vehiclenet index build g.npz --out g.index",
                          shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
                          env=subprocess_env(VEHICLENET_HOME=str(tmp_path / "home")))
    one_error(proc, 1, "while writing g.index: File too large")
    assert not (tmp_path / "g.index").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    # Image folders nested beyond PATH_MAX: the folder that cannot be listed is named.
    fd = os.open(tmp_path, os.O_RDONLY)
    for _ in range(24):
        os.mkdir("d" * 200, dir_fd=fd)
        inner = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(os.open("x.png", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    os.close(fd)
    proc = cli("embed", tmp_path / ("d" * 200), "--out", "f.npz", "--no-pretrained", cwd=tmp_path)
    assert proc.returncode == 1 and "folder holds no image files" in proc.stderr
    assert "cannot list it (File name too long); move its images to a shorter path" in proc.stderr
    subprocess.run(["rm", "-rf", str(tmp_path / ("d" * 200))], check=True)  # shutil cannot remove it


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("cc"), reason="needs a C compiler")
def test_a_library_without_the_expected_functions_falls_back_with_a_named_reason(tmp_path):
    """A library at the kernels' name whose .sha256 line matches but which lacks the package's
    functions (another build, a planted file): named, and the fallback used, never an AttributeError."""
    q, g = np.eye(2, 8, dtype=np.float32), np.eye(4, 8, dtype=np.float32)
    np.savez(tmp_path / "f.npz", query_features=q, query_ids=np.arange(2), query_cams=np.zeros(2, np.int64),
             gallery_features=g, gallery_ids=np.arange(4) % 2, gallery_cams=np.ones(4, np.int64))
    kernels = {"VEHICLENET_KERNEL_CACHE": str(tmp_path / "kernels")}
    first = cli("evaluate", "--features", "f.npz", "--json", cwd=tmp_path, timeout=600, **kernels)
    assert first.returncode == 0, first.stderr[-2000:]
    assert cli("info", cwd=tmp_path, timeout=600, **kernels).returncode == 0  # builds the oneDNN kernels
    (tmp_path / "empty.c").write_text("int vn_nothing(void) { return 0; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", tmp_path / "empty.so", tmp_path / "empty.c"], check=True)
    libraries = sorted((tmp_path / "kernels").glob("*.so"))
    assert {p.name.split("-")[0] for p in libraries} == {"cpu_kernels", "retrieval_kernels"}
    for lib in libraries:
        shutil.copy(tmp_path / "empty.so", lib)
        lib.with_name(lib.name + ".sha256").write_text(f"{hashlib.sha256(lib.read_bytes()).hexdigest()}  {lib.name}\n")
    again = cli("-v", "evaluate", "--features", "f.npz", "--json", cwd=tmp_path, **kernels)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert "retrieval kernels unavailable" in again.stderr and "has no VnJaccardRows" in again.stderr
    assert json.loads(again.stdout.splitlines()[-1])["mAP"] == json.loads(first.stdout.splitlines()[-1])["mAP"]
    info = cli("info", cwd=tmp_path, **kernels)
    assert info.returncode == 0 and "cpu convolutions: MindSpore's Conv2D" in info.stdout
    assert "has no VnConvS1" in info.stdout and "Traceback" not in info.stderr
