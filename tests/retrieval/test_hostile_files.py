"""Hostile inputs, round 2 (issue 29, items 6, 10 and 11): names that would drive the terminal,
features no reader may accept, and index files whose hashes are right but whose shapes are not,
through the real CLI in subprocesses. Each asserts the exit code, the named file and no traceback.
"""
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
from PIL import Image

from support.http_server import subprocess_env

HEADER = struct.Struct("<8sIIQQ32s")  # the index file's header, as its format documents


def cli(*args, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600,
                          env=subprocess_env(GLOG_v="3", VEHICLENET_HOME=str(cwd / "home"), **env))


def unit_rows(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clean(proc: subprocess.CompletedProcess) -> bool:
    return "Traceback" not in proc.stderr and "Warning" not in proc.stderr and len(proc.stderr.splitlines()) == 1


# --------------------------------------------------------------------------- item 6

EVIL = ["g/\x1b[31mRED\x1b[0m.jpg", "g/two\n   1  0.0000  g/forged.jpg", "g/plain.jpg", "g/caf\u00e9.jpg"]


def test_search_escapes_names_that_would_drive_the_terminal(tmp_path):
    from vehiclenet.embedding.result import save_features

    feats = unit_rows(4)
    save_features(tmp_path / "g.npz", feats, EVIL)
    save_features(tmp_path / "q.npz", feats[:1], ["q/\x1b]0;title\x07q.jpg"])
    assert cli("index", "build", "g.npz", "--out", "g.index", cwd=tmp_path).returncode == 0
    for env in ({}, {"PYTHONIOENCODING": "ascii"}):
        proc = cli("search", "--index", "g.index", "--features", "q.npz", "--top-k", 4, cwd=tmp_path, **env)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout
        lines = proc.stdout.splitlines()
        assert len(lines) == 5, lines  # a heading and 4 matches: no forged line
        assert lines[0].startswith("query 'q/\\x1b]0;title\\x07q.jpg': top 4")
        assert {re.match(r"\s*\d+  \S+  (.*)$", line).group(1) for line in lines[1:]} == {
            repr(EVIL[0]), repr(EVIL[1]), "g/plain.jpg", "g/caf\\xe9.jpg" if env else "g/caf\u00e9.jpg"}
    proc = cli("search", "--index", "g.index", "--features", "q.npz", "--top-k", 4, "--json", cwd=tmp_path)
    assert {m["path"] for m in json.loads(proc.stdout)["results"][0]["matches"]} == set(EVIL)


@pytest.mark.slow
def test_rank_escapes_names_that_would_drive_the_terminal(tmp_path):
    from vehiclenet.embedding.result import save_features

    query = tmp_path / "q\x1b[2J\nforged.png"
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(query, format="PNG")
    save_features(tmp_path / "g.npz", unit_rows(4, 512), EVIL, flip=False)
    proc = cli("rank", "--query", query, "--gallery", "g.npz", "--no-pretrained", "--no-flip", "--no-picture",
               "--image-size", 32, "--top-k", 4, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\x1b" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert len(lines) == 5 and lines[0].startswith(f"query {str(query)!r}"), lines


# --------------------------------------------------------------------------- item 10

BAD_FEATURES: Dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "NaN": lambda f: np.where(np.arange(len(f))[:, None] == 1, np.nan, f).astype(np.float32),
    "inf": lambda f: np.where(np.arange(len(f))[:, None] == 2, np.inf, f).astype(np.float32),
    "all-zero": lambda f: np.where(np.arange(len(f))[:, None] == 0, 0, f).astype(np.float32),
    "int8": lambda f: (f * 100).astype(np.int8),
    "bool": lambda f: f > 0,
    "complex": lambda f: f.astype(np.complex64),
    "text": lambda f: f.astype(str),
    "unnormalised": lambda f: f * 1e15,
    "0-wide": lambda f: f[:, :0],
    "0-row": lambda f: f[:0],
}
WORDS = {"NaN": "NaN or inf (row 1)", "inf": "NaN or inf (row 2)", "all-zero": "all-zero row(s) (rows 0)",
         "int8": "dtype int8", "bool": "dtype bool", "complex": "dtype complex64", "text": "dtype <U",
         "unnormalised": "row 0 has length 1e+15, not 1", "0-wide": "0-wide", "0-row": "has no rows"}


def test_every_reader_refuses_features_no_distance_can_be_trusted_on(tmp_path):
    from vehiclenet.embedding.result import save_features

    good = unit_rows(4)
    save_features(tmp_path / "good.npz", good, [f"g{i}.jpg" for i in range(4)])
    assert cli("index", "build", "good.npz", "--out", "good.index", cwd=tmp_path).returncode == 0
    before = (tmp_path / "good.index").read_bytes()
    for case, spoil in BAD_FEATURES.items():
        bad = spoil(good)
        path = tmp_path / f"{case}.npz"
        np.savez(path, features=bad, paths=np.array([f"b{i}.jpg" for i in range(len(bad))]))
        for argv in (["index", "build", path, "--out", "x.index"], ["index", "add", "good.index", path],
                     ["search", "--index", "good.index", "--features", path]):
            proc = cli(*argv, cwd=tmp_path)
            assert proc.returncode == 1, (case, argv, proc.stdout, proc.stderr)
            assert f"{path}: features" in proc.stderr and WORDS[case] in proc.stderr, (case, argv, proc.stderr)
            assert clean(proc) and proc.stdout == "", (case, argv, proc.stderr)
        assert (tmp_path / "good.index").read_bytes() == before and not (tmp_path / "x.index").exists()


def test_evaluate_refuses_integer_and_unnormalised_features(tmp_path):
    q, g = unit_rows(2, seed=1), unit_rows(4, seed=2)
    for case, (qf, gf) in {"int8": ((q * 100).astype(np.int8), g), "unnormalised": (q, g * 7)}.items():
        path = tmp_path / f"{case}.npz"
        np.savez(path, query_features=qf, query_ids=np.arange(2), query_cams=np.zeros(2, np.int64),
                 gallery_features=gf, gallery_ids=np.arange(4) % 2, gallery_cams=np.ones(4, np.int64))
        proc = cli("evaluate", "--features", path, cwd=tmp_path)
        assert proc.returncode == 1 and f"{path}: " in proc.stderr and clean(proc), proc.stderr
        assert ("dtype int8" if case == "int8" else "row 0 has length 7, not 1") in proc.stderr


def test_index_inputs_with_bad_flip_or_ids_are_named(tmp_path):
    feats = unit_rows(3)
    paths = np.array(["a.jpg", "b.jpg", "c.jpg"])
    cases = {"flip-array": {"flip": np.array([1, 0, 1])}, "flip-text": {"flip": np.array("yes")},
             "ids-text": {"ids": np.array(["a", "b", "c"])}, "ids-short": {"ids": np.arange(2)}}
    for case, extra in cases.items():
        np.savez(tmp_path / f"{case}.npz", features=feats, paths=paths, **extra)
        proc = cli("index", "build", f"{case}.npz", "--out", "x.index", cwd=tmp_path)
        assert proc.returncode == 1 and f"{case}.npz: " in proc.stderr and clean(proc), (case, proc.stderr)
        assert ("flip must be a single true/false value" if case.startswith("flip") else "ids") in proc.stderr


# --------------------------------------------------------------------------- item 11


def resign(path: Path, out: Path, edit: Callable[[dict, bytearray], None]) -> Path:
    """Copy the index ``path`` to ``out`` with its manifest (and part bytes) edited, every
    sha256 recomputed: a file whose hashes all match but whose content was changed."""
    data = bytearray(path.read_bytes())
    magic, version, reserved, offset, length, _ = HEADER.unpack(bytes(data[:HEADER.size]))
    manifest = json.loads(bytes(data[offset:offset + length]))
    body = data[:offset]
    edit(manifest, body)
    for desc in manifest["parts"].values():
        start, size = desc["offset"], desc["length"]
        desc["sha256"] = hashlib.sha256(bytes(body[start:start + size])).hexdigest()
    text = json.dumps(manifest).encode()
    body[:HEADER.size] = HEADER.pack(magic, version, reserved, offset, len(text), hashlib.sha256(text).digest())
    out.write_bytes(bytes(body) + text)
    return out


def _fewer_rows(m: dict, _: bytearray) -> None:
    m["parts"]["vectors"].update(shape=[3, 8], length=96)


def _retyped(m: dict, _: bytearray) -> None:
    m["parts"]["vectors"]["dtype"] = "<i4"


def _offsets_out_of_range(m: dict, body: bytearray) -> None:
    start = m["parts"]["path_offsets"]["offset"]
    body[start + 8:start + 16] = struct.pack("<q", -5)
    body[start + 32:start + 40] = struct.pack("<q", 10 ** 6)


def _huge_ef_search(m: dict, _: bytearray) -> None:
    m["params"]["ef_search"] = 2 ** 31


def _params_list(m: dict, _: bytearray) -> None:
    m["params"] = [1, 2]


TAMPERED = {
    "parameters a JSON list": (_params_list, "search parameters are a list, not an object"),
    "fewer vector rows than paths": (_fewer_rows, "part vectors is <f4 of shape [3, 8], not <f4 of shape (4, 8)"),
    "vectors re-typed": (_retyped, "part vectors is <i4"),
    "path offsets out of range": (_offsets_out_of_range, "path offsets run outside the stored paths"),
}


def test_index_files_whose_hashes_match_but_shapes_do_not_are_refused(tmp_path):
    from vehiclenet.embedding.result import save_features

    feats = unit_rows(4)
    save_features(tmp_path / "good.npz", feats, [f"g{i}.jpg" for i in range(4)])
    assert cli("index", "build", "good.npz", "--out", "good.index", cwd=tmp_path).returncode == 0
    assert cli("index", "build", "good.npz", "--out", "hnsw.index", "--kind", "hnsw-sq8",
               cwd=tmp_path).returncode == 0
    cases = {name: resign(tmp_path / "good.index", tmp_path / f"t{i}.index", edit)
             for i, (name, (edit, _)) in enumerate(TAMPERED.items())}
    list_manifest = tmp_path / "list.index"
    data = bytearray((tmp_path / "good.index").read_bytes())
    _, version, reserved, offset, _, _ = HEADER.unpack(bytes(data[:HEADER.size]))
    text = b"[1, 2]"
    data[:HEADER.size] = HEADER.pack(bytes(data[:8]), version, reserved, offset, len(text),
                                     hashlib.sha256(text).digest())
    list_manifest.write_bytes(bytes(data[:offset]) + text)
    cases["manifest a JSON list"] = list_manifest
    cases["ef_search beyond a C int"] = resign(tmp_path / "hnsw.index", tmp_path / "ef.index", _huge_ef_search)
    trailing = tmp_path / "trailing.index"
    trailing.write_bytes((tmp_path / "good.index").read_bytes() + b"appended" * 100)
    cases["bytes after the manifest"] = trailing
    words = {**{k: w for k, (_, w) in TAMPERED.items()}, "manifest a JSON list": "its manifest is a JSON list",
             "ef_search beyond a C int": "search parameter ef_search",
             "bytes after the manifest": "800 bytes after the end of the index"}
    for case, index in cases.items():
        for argv in (["search", "--index", index, "--features", "good.npz"], ["index", "add", index, "good.npz"]):
            proc = cli(*argv, cwd=tmp_path)
            assert proc.returncode == 1, (case, proc.stdout, proc.stderr)
            assert f"{index}: " in proc.stderr and words[case] in proc.stderr and clean(proc), (case, proc.stderr)


def test_tuning_beyond_what_faiss_takes_is_refused_before_building(tmp_path):
    from vehiclenet.embedding.result import save_features

    save_features(tmp_path / "good.npz", unit_rows(4), [f"g{i}.jpg" for i in range(4)])
    proc = cli("index", "build", "good.npz", "--out", "h.index", "--kind", "hnsw-sq8", "--ef-search", 2 ** 31,
               cwd=tmp_path)
    assert proc.returncode == 2 and "--ef-search must be from 1 to 2147483647" in proc.stderr and clean(proc)
    assert not (tmp_path / "h.index").exists()


# --------------------------------------------------------------------------- item 5


@pytest.mark.slow
def test_a_compiled_graph_of_another_entry_with_its_record_is_compiled_again(tmp_path):
    """Graph mode (more than 4 images) at two input sizes fills two compile cache entries; the
    graph files and files.json of one copied into the other (a batch-1 graph once served a
    batch-2 call one row) or a record re-signed with another key are never used."""
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(5)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")

    def embed(size: int, out: str) -> subprocess.CompletedProcess:
        proc = cli("-v", "embed", "imgs", "--out", out, "--no-pretrained", "--no-flip", "--image-size", size,
                   cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    embed(64, "a.npz")
    embed(96, "b.npz")
    compiled = tmp_path / "home" / "compiled"
    entries = {json.loads((p / "files.json").read_text())["key"]: p for p in compiled.iterdir() if p.is_dir()}
    assert len(entries) == 2 and (compiled / ".record-key").stat().st_mode & 0o777 == 0o600
    small, large = sorted(entries.values(), key=lambda p: p.stat().st_mtime_ns)
    reference = np.load(tmp_path / "b.npz")["features"]
    for tamper in ("copied", "re-signed"):
        if tamper == "copied":
            shutil.rmtree(large / "rank_0")
            shutil.copytree(small / "rank_0", large / "rank_0")
            shutil.copy(small / "files.json", large / "files.json")
        else:
            record = json.loads((large / "files.json").read_text())
            record["hmac"] = hashlib.sha256(b"someone else's key").hexdigest()
            (large / "files.json").write_text(json.dumps(record))
        proc = embed(96, "again.npz")
        assert f"compile cache entry {large} does not match its record: compiling it again" in proc.stderr, tamper
        np.testing.assert_array_equal(np.load(tmp_path / "again.npz")["features"], reference)
    proc = embed(96, "hit.npz")
    assert f"compile cache hit: {large}" in proc.stderr
