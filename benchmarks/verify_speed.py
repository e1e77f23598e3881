"""`vehiclenet verify` versus `sha256sum` on the same large file, end to end, same run.

Both are run as fresh processes (what a user or a script does), alternating, several
times, with the file already in the page cache (the first, cold read is a disk benchmark,
not a hashing one). Also measures the start-up cost of the command line without
MindSpore.

    python benchmarks/verify_speed.py [--size-mb 300] [--repeat 5] [--dir /tmp]
"""
import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent


def timed(cmd: List[str], env: Dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return elapsed


def write_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    block = os.urandom(16 << 20)
    with open(path, "wb") as f:
        left = size
        while left:
            chunk = block[: min(left, len(block))]
            # Vary each block so the file is not one repeated pattern.
            chunk = hashlib.sha256(str(left).encode()).digest() + chunk[32:]
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=300, help="file size in MB (10^6 bytes); default 300")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per command; default 5")
    parser.add_argument("--dir", default=None, help="folder for the temporary file (default: system temp)")
    parser.add_argument(
        "--no-bytecode",
        action="store_true",
        help="keep PYTHONDONTWRITEBYTECODE for the children (every run recompiles vehiclenet; "
        "an installed package has its .pyc files, so by default they are allowed)",
    )
    args = parser.parse_args()

    sha256sum = shutil.which("sha256sum")
    if sha256sum is None:
        raise SystemExit("sha256sum not found on PATH")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not args.no_bytecode:
        env.pop("PYTHONDONTWRITEBYTECODE", None)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="vehiclenet-bench-") as tmp:
        tmp_path = Path(tmp)
        size = args.size_mb * 1_000_000
        target = tmp_path / "bench_model.ckpt"
        print(f"writing {size / 1e6:.0f} MB test file {target} ...", flush=True)
        sha = write_file(target, size)
        manifest = tmp_path / "assets.json"
        manifest.write_text(json.dumps({"assets": [{
            "name": "bench", "file": target.name, "sha256": sha, "size": size,
            "urls": ["https://example.invalid/" + target.name],
        }]}))
        env["VEHICLENET_ASSETS"] = str(manifest)
        env["VEHICLENET_HOME"] = str(tmp_path / "cache")
        tiny = tmp_path / "tiny.bin"
        tiny.write_bytes(b"x")
        tiny_sha = hashlib.sha256(b"x").hexdigest()

        ours = [sys.executable, "-m", "vehiclenet", "verify", str(target)]
        theirs = [sha256sum, str(target)]
        # Warm-up: page cache for the file, .pyc files for the package.
        timed(theirs, env)
        timed(ours, env)

        t_ours: List[float] = []
        t_theirs: List[float] = []
        for _ in range(args.repeat):
            t_theirs.append(timed(theirs, env))
            t_ours.append(timed(ours, env))

        start_bare = [timed([sys.executable, "-c", "pass"], env) for _ in range(args.repeat)]
        start_version = [timed([sys.executable, "-m", "vehiclenet", "--version"], env) for _ in range(args.repeat)]
        start_verify = [
            timed([sys.executable, "-m", "vehiclenet", "verify", "--sha256", tiny_sha, str(tiny)], env)
            for _ in range(args.repeat)
        ]
        sys.path.insert(0, str(REPO))
        from vehiclenet.fileio import sha256_file

        t0 = time.perf_counter()
        sha256_file(target)
        t_hash = time.perf_counter() - t0

    def fmt(values: List[float]) -> str:
        return f"median {statistics.median(values):.3f} s, best {min(values):.3f} s"

    mb = size / 1e6
    med_ours, med_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    print()
    print(f"file: {mb:.0f} MB, {args.repeat} runs each, warm page cache, {os.cpu_count()} CPUs")
    print(f"vehiclenet verify   : {fmt(t_ours)}  ({mb / med_ours:.0f} MB/s end to end)")
    print(f"sha256sum           : {fmt(t_theirs)}  ({mb / med_theirs:.0f} MB/s end to end)")
    print(f"speed-up            : {med_theirs / med_ours:.2f}x ({'faster' if med_ours < med_theirs else 'SLOWER'} "
          f"than sha256sum)")
    print(f"in-process sha256_file: {t_hash:.3f} s ({mb / t_hash:.0f} MB/s)")
    print(f"start-up: python -c pass {fmt(start_bare)}")
    print(f"          vehiclenet --version {fmt(start_version)}")
    print(f"          vehiclenet verify (1-byte file) {fmt(start_verify)}")
    print(f"          bytecode caching {'off (--no-bytecode)' if args.no_bytecode else 'on'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
