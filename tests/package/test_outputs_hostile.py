"""Hostile output paths (issue 14): devices, FIFOs and sockets given as outputs, outputs that are
the command's own inputs, through every command that writes.

Each case plants the real thing and runs ``python -m vehiclenet`` in a subprocess; it asserts
the exit code, the message naming the path, that the victim is exactly what it was, and that
nothing is left behind. FIFO cases run under a subprocess timeout, so a regression hangs
nothing but fails.
"""
import os
import socket
import stat
from pathlib import Path

import pytest

from support.hostile import (FILE, MISSING_WEIGHTS, PAYLOAD, PRECIOUS, cli, imported_mindspore, make_images, plain_env, snapshot, tree)
from support.http_server import Route, asset_entry, write_manifest


# --------------------------------------------------------------------------- 2. output paths


def assert_refused(proc, option: str, path: Path, words: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{option} {str(path)!r}" in proc.stderr and words in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and MISSING_WEIGHTS not in proc.stderr
    assert not imported_mindspore(proc.stderr)  # refused before MindSpore or the network


def special_file(kind: str, tmp_path: Path) -> Path:
    if kind == "fifo":
        path = tmp_path / "pipe.npz"
        os.mkfifo(path)
    elif kind == "socket":
        path = tmp_path / "sock.npz"
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))  # the socket file stays after close
    elif kind == "link-to-device":
        path = tmp_path / "link.npz"
        path.symlink_to("/dev/full")
    else:
        path = Path(kind)
    return path


SPECIAL = {"/dev/full": "character device", "/dev/null": "character device", "fifo": "FIFO",
           "socket": "socket", "link-to-device": "character device"}


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_out_device_fifo_or_socket_is_refused(tmp_path, kind):
    (img,) = make_images(tmp_path / "imgs", 1)
    out = special_file(kind, tmp_path)
    before = snapshot(out)
    target = Path(os.path.realpath(out))
    target_before = snapshot(target)
    listing = tree(tmp_path)
    proc = cli("embed", img, "--out", out, "--checkpoint", MISSING_WEIGHTS, env=plain_env(tmp_path),
               importtime=True)
    assert_refused(proc, "--out", out, SPECIAL[kind])
    assert snapshot(out) == before and snapshot(target) == target_before  # still the device / FIFO / socket
    assert tree(tmp_path) == listing


def test_out_that_is_an_input_is_refused(tmp_path):
    """`embed a.jpg b.jpg --out a.jpg`, and the same input reached through a link, a hard link
    or a folder: refused by inode, the input left as it was."""
    a, b = make_images(tmp_path / "imgs")
    link = tmp_path / "link.npz"
    link.symlink_to(a)
    hard = tmp_path / "hard.npz"
    os.link(b, hard)
    cases = [(("embed", a, b), a, a), (("embed", a, b), link, a), (("embed", tmp_path / "imgs"), hard, b),
             (("embed", tmp_path / "imgs"), b, b)]
    env = plain_env(tmp_path)
    for args, out, victim in cases:
        before, listing = snapshot(victim), tree(tmp_path)
        proc = cli(*args, "--out", out, "--checkpoint", MISSING_WEIGHTS, env=env, importtime=True)
        assert_refused(proc, "--out", out, "own input")
        assert snapshot(victim) == before
        assert tree(tmp_path) == listing


def test_rank_out_that_is_the_query_or_gallery_is_refused(tmp_path):
    q, g = make_images(tmp_path / "imgs")
    env = plain_env(tmp_path)
    for out in (q, g):
        before, listing = snapshot(out), tree(tmp_path)
        proc = cli("rank", "--query", q, "--gallery", tmp_path / "imgs", "--out", out,
                   "--checkpoint", MISSING_WEIGHTS, env=env, importtime=True)
        assert_refused(proc, "--out", out, "own input")
        assert snapshot(out) == before and tree(tmp_path) == listing


def test_export_out_that_is_the_checkpoint_is_refused(tmp_path, http_server):
    """`export --format CKPT --out ft.ckpt --checkpoint ft.ckpt` (also as `--out ft`, the suffix
    added, and through a link), and --out naming the cached published checkpoint it would read."""
    ft = tmp_path / "ft.ckpt"
    ft.write_bytes(PRECIOUS)
    link = tmp_path / "link.ckpt"
    link.symlink_to(ft)
    env = plain_env(tmp_path)
    for out in (ft, tmp_path / "ft", link):
        before, listing = snapshot(ft), tree(tmp_path)
        proc = cli("export", "--format", "CKPT", "--out", out, "--checkpoint", ft, env=env, importtime=True)
        shown = out if out.suffix else out.with_name(out.name + ".ckpt")
        assert_refused(proc, "--out", shown, "own input")
        assert snapshot(ft) == before and tree(tmp_path) == listing
    # Without --checkpoint the input is the cached published checkpoint.
    url = http_server.add("/w.ckpt", Route(body=PAYLOAD))
    manifest = write_manifest(tmp_path, [asset_entry("w", FILE, PAYLOAD, [url])])
    cached = tmp_path / "home" / FILE
    cached.parent.mkdir()
    cached.write_bytes(PAYLOAD)
    before = snapshot(cached)
    proc = cli("export", "--format", "CKPT", "--out", cached, env=dict(env, VEHICLENET_ASSETS=str(manifest)),
               importtime=True)
    assert_refused(proc, "--out", cached, "own input")
    assert snapshot(cached) == before and http_server.requests == []


def test_evaluate_save_features_onto_the_data_set_is_refused(tmp_path):
    veri = tmp_path / "veri"
    make_images(veri / "image_query", 1)
    gallery = make_images(veri / "image_test", 2)
    names = veri / "name_test.txt"
    names.write_text("".join(f"{p.name}\n" for p in gallery))
    env = plain_env(tmp_path)
    for out in (gallery[1], names):
        before, listing = snapshot(out), tree(tmp_path)
        proc = cli("evaluate", "--data", veri, "--save-features", out, "--checkpoint", MISSING_WEIGHTS,
                   env=env, importtime=True)
        assert_refused(proc, "--save-features", out, "own input")
        assert snapshot(out) == before and tree(tmp_path) == listing


def test_outputs_beside_inputs_are_allowed_and_late_special_files_refused(tmp_path):
    """The library checks behind the CLI: an .npz in an input folder is no input (embed reads images
    only), and atomic_write refuses a FIFO that appears while the output is made, leaving no temp file."""
    from vehiclenet.errors import UsageError
    from vehiclenet.fileio import atomic_write, check_output_file, is_image_path

    imgs = tmp_path / "imgs"
    make_images(imgs)
    feats = imgs / "feats.npz"
    feats.write_bytes(PRECIOUS)
    check_output_file(feats, "--out", [imgs], accept=is_image_path)  # no error
    late = tmp_path / "late.npz"
    with pytest.raises(UsageError, match="FIFO"):
        with atomic_write(late) as handle:
            handle.write(PRECIOUS)
            os.mkfifo(late)
    assert stat.S_ISFIFO(os.lstat(late).st_mode)
    assert tree(tmp_path) == {"imgs", "late.npz", *(f"imgs/{p.name}" for p in imgs.iterdir())}
