"""Commands that need no network graph never import MindSpore (they start in milliseconds)."""
import hashlib
import subprocess
import sys

from support.http_server import Route, subprocess_env, write_manifest


def _modules_after(argv, env):
    script = ("import sys\nfrom vehiclenet.cli import main\n"
              f"rc = main({argv!r})\n"
              "print('RC', rc, 'MS', 'mindspore' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    return proc.stdout.strip().splitlines()[-1]


def test_download_and_info_do_not_import_mindspore(tmp_path, http_server):
    data = b"checkpoint bytes " * 4096
    url = http_server.add("/w.ckpt", Route(body=data))
    manifest = write_manifest(tmp_path, [{"name": "w", "file": "w.ckpt", "urls": [url],
                                          "sha256": hashlib.sha256(data).hexdigest()}])
    env = subprocess_env(VEHICLENET_ASSETS=str(manifest), VEHICLENET_HOME=str(tmp_path / "home"))
    assert _modules_after(["download", "--quiet"], env) == "RC 0 MS False"   # network fetch
    assert _modules_after(["download", "--quiet"], env) == "RC 0 MS False"   # cache hit
    assert _modules_after(["verify", "--quiet"], env) == "RC 0 MS False"
    assert _modules_after(["info", "--no-device"], env) == "RC 0 MS False"
    # `info` without --no-device reports the device, for which it does import MindSpore:
    assert _modules_after(["info"], env) == "RC 0 MS True"


def test_embed_merge_does_not_import_mindspore(tmp_path):
    """`embed-merge` only reads chunk files: a folder written here through the library, no network."""
    import numpy as np

    from vehiclenet.embedding import shards
    from vehiclenet.embedding.result import FeatureResult

    paths = [f"img{i}.jpg" for i in range(5)]
    job = shards.ShardJob(images=5, inputs_sha256=shards.inputs_digest(paths), chunk_size=2, weights="sha256:00",
                          flip=True, precision="fp32", image_size=(384, 384), skip_bad=False, version="0")
    shards.prepare_folder(tmp_path / "feats", job)
    rng = np.random.default_rng(0)
    for index in range(job.chunks):
        a, b = job.chunk_range(index)
        feats = rng.standard_normal((b - a, 8)).astype(np.float32)
        res = FeatureResult(feats / np.linalg.norm(feats, axis=1, keepdims=True), paths[a:b])
        shards._write_chunk(tmp_path / "feats", job, index, paths[a:b], res)
    argv = ["embed-merge", str(tmp_path / "feats"), "--out", str(tmp_path / "f.npz")]
    assert _modules_after(argv, subprocess_env()) == "RC 0 MS False"
    assert np.load(tmp_path / "f.npz")["paths"].tolist() == paths


def test_index_commands_and_search_by_features_do_not_import_mindspore(tmp_path):
    import os

    import numpy as np

    from vehiclenet.embedding.result import save_features

    feats = np.eye(8, 16, dtype=np.float32)
    save_features(tmp_path / "a.npz", feats[:5], [f"g{i}.jpg" for i in range(5)])
    save_features(tmp_path / "b.npz", feats[5:], [f"g{i}.jpg" for i in range(5, 8)])
    index = str(tmp_path / "g.index")
    env = dict(os.environ)
    assert _modules_after(["index", "build", str(tmp_path / "a.npz"), "--out", index], env) == "RC 0 MS False"
    assert _modules_after(["index", "add", index, str(tmp_path / "b.npz")], env) == "RC 0 MS False"
    assert _modules_after(["index", "info", index], env) == "RC 0 MS False"
    assert _modules_after(["search", "--index", index, "--features", str(tmp_path / "b.npz")], env) == "RC 0 MS False"


def test_calibrate_does_not_import_mindspore(tmp_path):
    import numpy as np

    from vehiclenet.embedding.result import save_features

    rng = np.random.default_rng(0)
    ids = np.repeat(np.arange(20), 3)
    x = rng.standard_normal((20, 16))[ids] + rng.standard_normal((60, 16))
    save_features(tmp_path / "v.npz", x / np.linalg.norm(x, axis=1, keepdims=True), [f"{i}.jpg" for i in range(60)],
                  ids=ids)
    argv = ["calibrate", str(tmp_path / "v.npz"), "--out", str(tmp_path / "t.json"), "--fmr", "0.01"]
    assert _modules_after(argv, subprocess_env()) == "RC 0 MS False"
