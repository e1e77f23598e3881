"""`vehiclenet embed` and `vehiclenet rank` as real subprocesses on real image files."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vehiclenet.retrieval.visualize import GREEN, NEUTRAL, QUERY_BLUE, RED, ranking_layout

from support.images import COLOURS, draw_vehicle  # noqa: F401 (used below)


def run_cli(*args, cwd):
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_embed_real_files_fails_on_corrupt_then_skips_it(tmp_path, small_ckpt):
    from vehiclenet import create_network
    from vehiclenet.embedding.features import embed

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    draw_vehicle(COLOURS[1], 1).save(imgs / "1_car.jpg", quality=90)
    draw_vehicle(COLOURS[2], 2).save(imgs / "2_car.png")
    draw_vehicle(COLOURS[3], 3).convert("L").save(imgs / "3_grey.png")
    rgba = draw_vehicle(COLOURS[1], 4).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(imgs / "4_rgba.png")
    corrupt = imgs / "5_corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    out = tmp_path / "feats.npz"

    failed = run_cli("embed", imgs, "--out", out, "--checkpoint", small_ckpt, "--batch-size", "4", cwd=tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert str(corrupt) in failed.stderr and "--skip-bad" in failed.stderr
    assert not out.exists()

    ok = run_cli("embed", imgs, "--out", out, "--checkpoint", small_ckpt, "--batch-size", "4", "--skip-bad",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "embedded 4 image(s)" in ok.stdout and "skipped 1" in ok.stdout and "5_corrupt.jpg" in ok.stdout
    assert "img/s" in ok.stdout
    assert "5_corrupt.jpg" in ok.stderr  # the warning names it too
    with np.load(out) as npz:
        feats, paths = npz["features"], [str(p) for p in npz["paths"]]
    good = [imgs / n for n in ("1_car.jpg", "2_car.png", "3_grey.png", "4_rgba.png")]
    assert paths == [str(p) for p in good]
    assert feats.dtype == np.float32 and feats.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    # Same pipeline as the library with the same weights.
    net = create_network(checkpoint=small_ckpt, include_top=False)
    np.testing.assert_allclose(feats, embed(net, good, batch_size=4).features, atol=2e-5)


def test_embed_usage_errors_exit_2(tmp_path):
    res = run_cli("embed", tmp_path, "--out", tmp_path / "f.npz", "--no-pretrained", "--batch-size", "0",
                  cwd=tmp_path)
    assert res.returncode == 2 and "--batch-size" in res.stderr


def test_output_paths_are_checked_before_any_work(tmp_path):
    """Unusable output paths are refused by name before weights are read (the checkpoint given does not
    exist, so reaching it would give another error), and never as a traceback."""
    img = tmp_path / "car.jpg"
    draw_vehicle(COLOURS[1], 0).save(img)
    (tmp_path / "folder.npz").mkdir()
    missing = tmp_path / "missing.ckpt"
    cases = [
        (("embed", img, "--out", tmp_path / "folder.npz"), "folder.npz' is a folder"),
        (("embed", img, "--out", img / "f.npz"), "is a file, not a folder"),
        (("rank", "--query", img, "--gallery", tmp_path, "--out", tmp_path / "r.xyz"), "r.xyz"),
        (("rank", "--query", img, "--gallery", tmp_path, "--out", tmp_path / "folder.npz"), "is a folder"),
        (("evaluate", "--data", tmp_path, "--save-features", tmp_path / "folder.npz"), "is a folder"),
    ]
    for args, message in cases:
        res = run_cli(*args, "--checkpoint", missing, cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr, (args, res.stderr[-2000:])
        assert "missing.ckpt" not in res.stderr and "Traceback" not in res.stderr
    # A query that does not exist is named before the weights are looked at (a bad input: exit 1).
    res = run_cli("rank", "--query", img, tmp_path / "gone.jpg", "--gallery", tmp_path, "--no-picture",
                  "--checkpoint", missing, cwd=tmp_path)
    assert res.returncode == 1 and "gone.jpg: no such file or folder" in res.stderr, res.stderr[-2000:]
    assert "missing.ckpt" not in res.stderr and "Traceback" not in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["car.jpg", "folder.npz"]


def test_system_level_write_failure_is_named_not_a_traceback(tmp_path, small_ckpt):
    img = tmp_path / "car.jpg"
    draw_vehicle(COLOURS[1], 0).save(img)
    res = run_cli("embed", img, "--out", "/proc/vehiclenet-features.npz", "--checkpoint", small_ckpt, "--no-flip",
                  cwd=tmp_path)  # /proc exists as a folder but takes no new files, not even from root
    assert res.returncode == 1 and "error: /proc/" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def _pixel(png: Image.Image, box, where="top"):
    left, top, right, bottom = box
    x = (left + right) // 2
    return png.getpixel((x, top + 1) if where == "top" else (x, bottom - 2))


def test_rank_prints_top_k_and_draws_the_picture(tmp_path, small_ckpt):
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    query = tmp_path / "0001_c001_00000001_0.jpg"
    draw_vehicle(COLOURS[1], 0).save(query, quality=92)
    k = 0
    for vid in (1, 2, 3):
        for cam in (2, 3):
            k += 1
            draw_vehicle(COLOURS[vid], 100 + k).save(gallery / f"{vid:04d}_c{cam:03d}_{k:08d}_0.jpg", quality=92)
    draw_vehicle((120, 120, 120), 99).save(gallery / "unknown_vehicle.png")
    out = tmp_path / "ranked.png"

    res = run_cli("rank", "--query", query, "--gallery", gallery, "--top-k", 7, "--out", out,
                  "--checkpoint", small_ckpt, "--batch-size", 8, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    lines = [ln.split() for ln in res.stdout.splitlines() if ln.strip() and ln.split()[0].isdigit()]
    assert [int(ln[0]) for ln in lines] == list(range(1, 8))
    dists = [float(ln[1]) for ln in lines]
    assert dists == sorted(dists)
    ranked = [Path(ln[2]).name for ln in lines]
    assert sorted(ranked) == sorted(p.name for p in gallery.iterdir())  # every gallery image, no query

    layout = ranking_layout(7, 128)
    with Image.open(out) as png:
        assert png.format == "PNG" and png.size == layout["size"]
        png = png.convert("RGB")
        assert _pixel(png, layout["query"]) == QUERY_BLUE
        for name, box in zip(ranked, layout["matches"]):
            expected = NEUTRAL if name.startswith("unknown") else (GREEN if name.startswith("0001_") else RED)
            assert _pixel(png, box, "top") == expected, name
            assert _pixel(png, box, "bottom") == expected, name

    # Gallery as an .npz: thumbnails come from the stored paths; the query is not ranked.
    from vehiclenet.embedding.result import save_features

    names = sorted(gallery.iterdir())[:3] + [query]
    feats = np.eye(4, 512, dtype=np.float32)
    save_features(tmp_path / "g.npz", feats, [str(p) for p in names])
    out2 = tmp_path / "sub" / "ranked_npz.png"
    res = run_cli("rank", "--query", query, "--gallery", tmp_path / "g.npz", "--top-k", 10, "--out", out2,
                  "--checkpoint", small_ckpt, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "top 3 of 3 gallery images" in res.stdout
    with Image.open(out2) as png:
        assert png.size == ranking_layout(3, 128)["size"]
