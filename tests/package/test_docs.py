"""The examples of README.md and docs/ run as written, and the pages' links resolve.

Every ```python and ```bash block runs in one folder holding what the examples name
(car1.jpg, car2.jpg, gallery/, VeRi/, finetuned.ckpt), with the "published" weights (a
published-layout checkpoint) served by a real HTTP server on 127.0.0.1 through a manifest, so
``create_network()`` downloads and verifies them as it would the real ones. A block that
cannot run here carries ``<!-- not run: why -->`` naming the test that runs the same thing; one
that runs here only at a smaller scale (40 epochs, 4 workers) carries ``<!-- run scaled: OLD =>
NEW; ... -->``: it runs with each OLD replaced by NEW (``{port}``: a free port), and every OLD
must be in the block, so the block cannot drift from what runs.
"""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from support.http_server import Route, TestServer, asset_entry, write_manifest
from support.datasets import make_vehicleid, make_veriwild
from support.images import COLOURS, draw_vehicle
from support.processes import free_port
from support.training import make_dataset

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- (?:not run: (?P<why>.*?)|run scaled: (?P<scaled>.*?)) -->\n)?"
                   r"```(?P<lang>python|bash)\n(?P<code>.*?)```", re.S)


def _blocks():
    for page in PAGES:
        for n, m in enumerate(BLOCK.finditer(page.read_text(encoding="utf-8")), 1):
            code = _scaled(m["code"], m["scaled"]) if m["scaled"] else m["code"]
            yield pytest.param(page, m["lang"], code, m["why"], id=f"{page.relative_to(REPO)}:{n}")


def _scaled(code: str, replacements: str) -> str:
    for pair in replacements.split("; "):
        old, new = (part.strip() for part in pair.split(" => "))
        assert old in code, f"run scaled: {old!r} is not in the block {code!r}"
        code = code.replace(old, new)  # {port} is taken when the block runs
    return code


BLOCKS = list(_blocks())
RUN = [b for b in BLOCKS if b.values[3] is None]
NOT_RUN = [b for b in BLOCKS if b.values[3] is not None]


@pytest.fixture(scope="module")
def world(tmp_path_factory, published_ckpt):
    """The folder the examples run in, and their environment."""
    root = tmp_path_factory.mktemp("examples")
    (root / "gallery").mkdir()
    for vid, seed in ((1, 1), (2, 2)):
        draw_vehicle(COLOURS[vid], seed).save(root / f"car{vid}.jpg", quality=92)
    for k, vid in enumerate((1, 1, 2, 2, 3, 3)):
        draw_vehicle(COLOURS[vid], 10 + k).save(root / "gallery" / f"{vid:04d}_c{k:03d}_{k:08d}_0.jpg", quality=92)
    for split, pictures in (("image_query", ((1, 1), (2, 2))), ("image_test", ((1, 3), (1, 4), (2, 5), (3, 6)))):
        (root / "VeRi" / split).mkdir(parents=True)
        for k, (vid, cam) in enumerate(pictures):
            draw_vehicle(COLOURS[vid], 30 + cam).save(root / "VeRi" / split / f"{vid:04d}_c{cam:03d}_{k:08d}_0.jpg")
    os.link(published_ckpt, root / "finetuned.ckpt")
    make_dataset(root / "my_vehicles")  # docs/finetune.md
    (root / "examples").symlink_to(REPO / "examples")
    _dataset_folders(root)
    server = TestServer().start()
    data = published_ckpt.read_bytes()
    url = server.add("/weights/published.ckpt", Route(body=data))
    (root / ".assets").mkdir()
    entry = {**asset_entry("published", "published.ckpt", data, [url], size=len(data)), "num_classes": 575}
    manifest = write_manifest(root / ".assets", [entry])
    env = dict(os.environ, VEHICLENET_ASSETS=str(manifest), VEHICLENET_HOME=str(root / ".home"), GLOG_v="3",
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    try:
        yield root, env
    finally:
        server.close()


def _dataset_folders(root: Path) -> None:
    """VehicleID (4 identities x 3 images, split small) and VERI-Wild (split large) for docs/datasets.md."""
    def jpeg(vid: int, seed: int) -> bytes:
        buf = io.BytesIO()
        draw_vehicle(COLOURS[vid % 3 + 1], seed).save(buf, format="JPEG", quality=92)
        return buf.getvalue()

    rows = [(f"{100 * vid + k:07d}", vid) for vid in range(1, 5) for k in range(3)]
    make_vehicleid(root / "VehicleID", rows, images={i: jpeg(v, int(i)) for i, v in rows})
    query = ["00001/0000101", "00002/0000201"]
    gallery = ["00001/0000102", "00002/0000202", "00001/0000103", "00003/0000301", "00002/0000203"]
    cams = dict(zip(query + gallery, (1, 3, 1, 3, 2, 1, 5)))
    images = {k: jpeg(int(k[:5]), int(k[6:])) for k in query + gallery}
    make_veriwild(root / "VERI-Wild", query, gallery, cams, n=10000, images=images)


@pytest.mark.slow
@pytest.mark.parametrize("page, lang, code, why", RUN)
def test_example_runs(world, page, lang, code, why):
    root, env = world
    code = code.replace("{port}", str(free_port()))
    if lang == "python":
        script = root / "example.py"
        script.write_text(code, encoding="utf-8")
        cmd = [sys.executable, str(script)]
    else:
        cmd = ["bash", "-e", "-o", "pipefail", "-c", code]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{page.name}:\n{code}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    _check_outputs(root, code, done.stdout)


def _check_outputs(root: Path, code: str, stdout: str) -> None:
    """What the README's quick starts promise, beyond running."""
    if "extract_features(emb, [\"car1.jpg\", \"gallery/\"])" in code:
        assert "(2, 512)" in stdout
        assert list((root / ".home").rglob("published.ckpt")), "create_network() kept no verified download"
    if "vehiclenet embed gallery/ --out gallery.npz --no-pretrained" in code:
        feats = np.load(root / "gallery.npz")
        assert feats["features"].shape == (6, 512) and str(feats["weights"]).startswith("random:seed=0:")
        assert (root / "ranked.png").is_file() and (root / "gallery.index").is_file()
        results = json.loads(stdout.strip().splitlines()[-1])["results"]
        assert [len(r["matches"]) for r in results] == [3, 3]
    if "--exclude-same-camera --cameras 1,2,3" in code:  # README "Filtered search": gallery cameras are 0-5
        matches = [line for line in stdout.splitlines() if line.startswith("   ")]
        assert len(matches) == 3 + 2, stdout  # search: cameras 1-3 (three images), rank: cameras 1-2
        assert {int(line.split("  cam ")[1].split()[0]) for line in matches[:3]} == {1, 2, 3}
        assert "top 3 of 3 (exact index, filtered: cameras 1,2,3; exclude same camera)" in stdout
        assert "top 2 of 2 gallery images" in stdout
    if "--meta meta.csv" in code:  # docs/large-galleries.md: six gallery images, all inside the filter
        assert ("top 3 of 6 (exact index, filtered: cameras 4; after 2018-03-11T08:00:00Z; before "
                "2018-03-11T09:00:00Z; tags red)") in stdout, stdout
        assert stdout.count("  cam 4  time 2018-03-11T08:30:00Z  tags red,van") == 3, stdout
    _check_scaled_outputs(root, code, stdout)


def _check_scaled_outputs(root: Path, code: str, stdout: str) -> None:
    """What the fine-tuning, export, sharded-embedding and dataset pages promise, beyond running."""
    if "finetune --data my_vehicles/ --out runs/exp1" in code:
        assert stdout.splitlines()[-1] == "runs/exp1/vehiclenet-e001.ckpt", stdout
        assert json.loads((root / "runs/exp1/labels.json").read_text())
    if "examples/finetune_own_script.py" in code:  # two epochs, then its checkpoint reloaded
        assert "epoch 2" in stdout and "reloaded" in stdout, stdout
        assert (root / "runs/exp2/labels.json").is_file()
        assert sorted(p.name for p in (root / "runs/exp2").glob("*.ckpt")) == ["vehiclenet-e001.ckpt",
                                                                              "vehiclenet-e002.ckpt"]
    if "--out runs/exp3" in code:  # two msrun workers, one set of checkpoints
        assert [p.name for p in (root / "runs/exp3").glob("*.ckpt")] == ["vehiclenet-e001.ckpt"]
    if "ort.InferenceSession" in code:
        shape, gap = stdout.strip().rsplit(" ", 1)
        assert shape == "(1, 512)" and float(gap) < 1e-3, stdout
    if "embed gallery/ --out-dir feats/" in code:
        assert np.load(root / "feats.npz")["features"].shape == (6, 512)
    if "--dataset vehicleid --data VehicleID" in code:
        assert "± " in stdout and (root / "vid_small.npz").is_file() and (root / "wild_large.npz").is_file()


def test_every_example_not_run_names_the_test_that_runs_it():
    assert RUN, "no example found"
    for param in NOT_RUN:
        why = param.values[3]
        named = re.findall(r"tests/\w+/test_\w+\.py|examples/\w+\.py", why)
        assert named and all((REPO / n).is_file() for n in named), (param.id, why)
    assert len(NOT_RUN) <= 4, [p.id for p in NOT_RUN]  # a new example that cannot run is a decision


def test_links_between_pages_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (page.parent / target).exists(), f"{page.relative_to(REPO)} links to missing {target}"


def test_readme_stays_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8")) < 16_000
