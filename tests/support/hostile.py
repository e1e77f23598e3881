"""What the hostile cases share: the served asset's bytes, the command line under a timeout (a
FIFO that blocked it fails the test instead of hanging the run), and snapshots of victims."""
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

from PIL import Image

from support.http_server import make_payload, subprocess_env

FILE = "w.ckpt"
PAYLOAD = make_payload(512 * 1024 + 7)
PRECIOUS = b"precious bytes that are not a checkpoint\n" * 8
TIMEOUT = 120  # seconds; a FIFO that blocked the CLI would otherwise hang the test run


def cli(*args, env: Dict[str, str], timeout: float = TIMEOUT, importtime: bool = False):
    """``python -m vehiclenet ARGS`` (with ``-X importtime`` to see what it imported)."""
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "vehiclenet", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


def imported_mindspore(stderr: str) -> bool:
    """Whether ``-X importtime`` output lists mindspore (or any of its modules)."""
    return re.search(r"^import time:.*\|\s*mindspore(\.|\s*$)", stderr, re.MULTILINE) is not None


def snapshot(path: Path):
    """Identity and content of a victim: entry type, inode, device numbers and bytes (regular files)."""
    st = os.lstat(path)
    data = path.read_bytes() if stat.S_ISREG(st.st_mode) else None
    link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return stat.S_IFMT(st.st_mode), st.st_ino, st.st_rdev, link, data


def tree(folder: Path) -> Set[str]:
    """Every entry below ``folder`` (links not followed), as relative paths."""
    found = set()
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            found.add(os.path.relpath(os.path.join(root, name), folder))
    return found


def env_without_network_settings(**extra: str) -> Dict[str, str]:
    env = subprocess_env(**extra)
    for key in ("VEHICLENET_MIRROR", "VEHICLENET_OFFLINE", "VEHICLENET_ASSETS"):
        env.pop(key, None)
    env.update(GLOG_v="3", VEHICLENET_TIMEOUT="5,5", VEHICLENET_RETRIES="1", VEHICLENET_BACKOFF="0.05",
               VEHICLENET_LOCK_TIMEOUT="30")
    env.update(extra)
    return env


def make_images(folder: Path, n: int = 2):
    """``n`` small images with VeRi-style names in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i + 1:04d}_c00{i + 1}_00000000_0.jpg"  # VeRi-style names
        Image.new("RGB", (32, 24), (40 * i, 90, 200)).save(path)
        paths.append(path)
    return paths


def plain_env(tmp_path: Path) -> Dict[str, str]:
    """A child environment with its own cache and no network settings."""
    return env_without_network_settings(VEHICLENET_HOME=str(tmp_path / "home"))


# Given to commands whose output is refused: were the refusal to regress, loading these weights
# would fail before anything is written (this suite runs as root too, where /dev/null could go).
MISSING_WEIGHTS = "missing-weights.ckpt"
