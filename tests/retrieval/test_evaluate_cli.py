"""`vehiclenet evaluate --features` through real subprocesses."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vehiclenet.retrieval.exact import cosine_distance
from vehiclenet.retrieval.metrics import evaluate
from vehiclenet.retrieval.rerank import re_rank

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "vehiclenet", "evaluate", *args],
                          capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((6, 16))

    def make(n):
        ids = rng.integers(0, 6, n)
        f = (centres[ids] + 0.9 * rng.standard_normal((n, 16))).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True), ids, rng.integers(0, 4, n)

    qf, qi, qc = make(25)
    gf, gi, gc = make(120)
    path = str(tmp_path_factory.mktemp("feats") / "f.npz")
    np.savez(path, query_features=qf, query_ids=qi, query_cams=qc,
             gallery_features=gf, gallery_ids=gi, gallery_cams=gc)
    return path, (qf, qi, qc, gf, gi, gc)


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def test_json_matches_library(data):
    path, (qf, qi, qc, gf, gi, gc) = data
    proc = run_cli("--features", path, "--json")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    want = evaluate(cosine_distance(qf, gf), qi, gi, qc, gc)
    assert out["mAP"] == pytest.approx(want.mAP, abs=1e-12)
    assert out["rank1"] == pytest.approx(want.rank(1)) and out["rank10"] == pytest.approx(want.rank(10))
    assert out["mINP"] == pytest.approx(want.mINP, abs=1e-12)
    assert out["num_query"] == 25 and out["num_valid_query"] == want.num_valid_query
    assert all(0.0 <= out[k] <= 1.0 for k in ("mAP", "rank1", "rank5", "rank10", "mINP"))
    assert "mAP" in proc.stdout.splitlines()[1] and out["rerank"] is None


def test_rerank_json_matches_library(data):
    path, (qf, qi, qc, gf, gi, gc) = data
    proc = run_cli("--features", path, "--rerank", "--k1", "20", "--k2", "6", "--lambda", "0.3", "--json")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    want = evaluate(re_rank(qf, gf, 20, 6, 0.3), qi, gi, qc, gc)
    assert out["mAP"] == pytest.approx(want.mAP, abs=1e-9)
    assert out["rank1"] == pytest.approx(want.rank(1))
    assert out["rerank"] == {"k1": 20, "k2": 6, "lambda": 0.3, "neighbours": "exact", "nprobe": None}


def test_rerank_with_neighbour_lists_from_a_gallery_index(data):
    """--neighbours exact (an exact gallery index over query + gallery) gives the default's
    figures exactly; an ivf index gives approximate re-ranking; both named in the JSON."""
    path, _ = data
    args = ("--features", path, "--rerank", "--k1", "20", "--k2", "6", "--json")
    default = last_json(run_cli(*args).stdout)
    proc = run_cli(*args, "--neighbours", "exact")
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert {k: out[k] for k in ("mAP", "cmc", "mINP")} == {k: default[k] for k in ("mAP", "cmc", "mINP")}
    assert out["rerank"]["neighbours"] == "exact"
    proc = run_cli(*args, "--neighbours", "ivf-flat", "--nprobe", "1")  # 145 items: 3 cells, one searched
    assert proc.returncode == 0, proc.stderr
    out = last_json(proc.stdout)
    assert out["rerank"]["neighbours"] == "ivf-flat" and out["rerank"]["nprobe"] == 1
    assert abs(out["mAP"] - default["mAP"]) < 0.1


def test_features_path_does_not_import_mindspore(data):
    path, _ = data
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['vehiclenet', 'evaluate', '--features', {path!r}, '--rerank', '--k1', '20', '--k2', '6']\n"
        "try:\n"
        "    runpy.run_module('vehiclenet', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "assert 'mindspore' not in sys.modules, 'mindspore was imported'\n"
        "print('CLEAN')\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("CLEAN")


def test_missing_key_names_file_and_key(tmp_path, data):
    _, (qf, qi, qc, gf, gi, gc) = data
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, query_features=qf, query_ids=qi, query_cams=qc, gallery_features=gf, gallery_ids=gi)
    proc = run_cli("--features", bad)
    assert proc.returncode == 1
    assert "bad.npz" in proc.stderr and "gallery_cams" in proc.stderr


def test_shape_mismatch_names_key(tmp_path, data):
    _, (qf, qi, qc, gf, gi, gc) = data
    bad = str(tmp_path / "short.npz")
    np.savez(bad, query_features=qf, query_ids=qi[:-1], query_cams=qc, gallery_features=gf,
             gallery_ids=gi, gallery_cams=gc)
    proc = run_cli("--features", bad, "--json")
    assert proc.returncode == 1
    assert "short.npz" in proc.stderr and "query_ids" in proc.stderr
    assert proc.stdout == ""


def test_not_an_npz_and_missing_file(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    proc = run_cli("--features", str(junk))
    assert proc.returncode == 1 and "junk.npz" in proc.stderr
    proc = run_cli("--features", str(tmp_path / "absent.npz"))
    assert proc.returncode == 1 and "absent.npz" in proc.stderr


def test_truncated_npz_and_plain_npy_name_file_without_traceback(tmp_path, data):
    path, (qf, *_rest) = data
    blob = open(path, "rb").read()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(blob[: len(blob) // 2])
    plain = tmp_path / "plain.npy"
    np.save(plain, qf)
    for bad in (trunc, plain):
        proc = run_cli("--features", str(bad))
        assert proc.returncode == 1
        assert bad.name in proc.stderr and "evaluate --save-features" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_bad_parameters_exit_2(data):
    path, _ = data
    proc = run_cli("--features", path, "--rerank", "--k1", "0")
    assert proc.returncode == 2 and "k1" in proc.stderr
    proc = run_cli("--features", path, "--rerank", "--k1", "20", "--k2", "30")
    assert proc.returncode == 2 and "k2=30 needs 1 <= k2 <= k1 + 1" in proc.stderr
    # A k1 beyond the 145 images is lowered to them, said, and reported as used.
    proc = run_cli("--features", path, "--rerank", "--k1", "1000", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "k1=1000 is not below their number, so k1=144, k2=15 are used" in proc.stderr
    assert last_json(proc.stdout)["rerank"]["k1"] == 144 and "re-ranked (k1=144, k2=15" in proc.stdout
    proc = run_cli("--features", path, "--save-features", "x.npz")
    assert proc.returncode == 2 and "--data" in proc.stderr
    proc = run_cli("--features", path, "--neighbours", "ivf-sq8")
    assert proc.returncode == 2 and "--rerank" in proc.stderr
    proc = run_cli("--json")  # neither --data nor --features: argparse usage error
    assert proc.returncode == 2
