"""The options every command shares (-q, -v, --json, --image-size, --query conventions), checked
on the parser of every command and through real subprocesses running real networks."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from vehiclenet.cli import build_parser

# Every command and action, and which of the shared options it must offer.
RESULTS = ["download", "verify", "info", "embed", "embed-merge", "rank", "index build", "index add", "index info", "search",
           "evaluate", "finetune", "export"]
EMBEDS = ["embed", "rank", "search", "evaluate", "finetune", "export"]


def _usage(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command.split(), "--help"])
    return " ".join(capsys.readouterr().out.split())  # argparse wraps the usage line


@pytest.mark.parametrize("command", RESULTS)
def test_every_command_has_the_common_options(command, capsys):
    usage = _usage(command, capsys)
    assert "[-q] [-v] [--json]" in usage, usage
    if command in EMBEDS:
        assert "[--image-size S]" in usage or "[--image-size IMAGE_SIZE]" in usage, usage
    if command in ("rank", "search"):
        assert "--query IMG [IMG ...]" in usage, usage


def test_quiet_and_verbose_before_or_after_the_command():
    parser = build_parser()
    for argv, quiet, verbose in ((["-v", "info"], False, True), (["info", "-v"], False, True),
                                 (["info", "-q"], True, False), (["-q", "info"], True, False), (["info"], False, False)):
        args = parser.parse_args(argv)
        assert (args.quiet, args.verbose) == (quiet, verbose), argv


def run_cli(*args, cwd):
    env = dict(os.environ, GLOG_v="3")
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_embed_rank_index_search_speak_json_quietly_at_a_chosen_size(tmp_path):
    gallery, queries = tmp_path / "gallery", tmp_path / "queries"
    gallery.mkdir()
    queries.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(gallery / f"car{i}.png")
    for i in (0, 2):
        (queries / f"car{i}.png").write_bytes((gallery / f"car{i}.png").read_bytes())
    small = ["--no-pretrained", "--image-size", "64", "--no-flip"]

    res = run_cli("embed", gallery, "--out", "g.npz", "--json", "-q", *small, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # stdout is the one JSON object, nothing else
    assert (out["out"], out["images"], out["dimension"], out["image_size"], out["skipped"]) == \
        ("g.npz", 4, 512, [64, 64], [])
    assert out["weights"].startswith("random:seed=0:")
    assert "INFO" not in res.stderr and "%|" not in res.stderr  # -q: no INFO lines, no progress bar
    assert np.load(tmp_path / "g.npz")["image_size"].tolist() == [64, 64]

    # Two queries (a folder), one picture each; each query's own file is left out of its gallery.
    res = run_cli("rank", "--query", queries, "--gallery", gallery, "--top-k", "2", "--out", "r.png", "--json",
                  "--thumb", "32", *small, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout)["results"]
    assert [r["query"] for r in results] == [str(queries / "car0.png"), str(queries / "car2.png")]
    for r, own, picture in zip(results, ("car0.png", "car2.png"), ("r-1.png", "r-2.png")):
        assert r["num_gallery"] == 4 and len(r["matches"]) == 2 and r["picture"] == picture
        # The same picture stored in the gallery is another file: it is the query's first match.
        assert r["matches"][0]["path"].endswith(own) and abs(r["matches"][0]["distance"]) < 1e-5
        with Image.open(tmp_path / picture) as png:
            assert png.format == "PNG"

    res = run_cli("index", "build", "g.npz", "--out", "g.index", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    built = json.loads(res.stdout)
    assert (built["count"], built["kind"], built["weights"]) == (4, "exact", out["weights"])
    res = run_cli("index", "add", "g.index", "g.npz", "--json", cwd=tmp_path)
    assert res.returncode == 0 and json.loads(res.stdout)["added"] == 0, res.stderr

    res = run_cli("search", "--index", "g.index", "--query", gallery / "car1.png", "--json", "-v", *small,
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    matches = json.loads(res.stdout)["results"][0]["matches"]
    assert len(matches) == 3 and all(not m["path"].endswith("car1.png") for m in matches)
    assert "DEBUG" in res.stderr  # -v after the command

    res = run_cli("rank", "--query", queries, "--gallery", "g.npz", "--image-size", "4", "--no-picture",
                  cwd=tmp_path)
    assert res.returncode == 2 and "--image-size must be in [32, 2048], got 4" in res.stderr
