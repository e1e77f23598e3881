"""Cold start: how long one image takes to an answer, each command in a fresh process.

    python benchmarks/cold_start.py [--repeats 2] [--only REGEX]

Measured, each in its own fresh process (wall time and that process's peak RSS, from
``os.wait4``): ``vehiclenet embed`` of one image, ``vehiclenet rank`` of one query against a
1,000-row gallery file, ``vehiclenet info``, ``vehiclenet verify`` of the checkpoint, and in
a script ``create_network(include_top=False)`` + first call, in graph and PyNative mode,
with a breakdown (import, build, load, first call = compile + run, second call = run);
and the time of network calls on 2, 8 and 32 images (first and steady) in each mode, from
which ``vehiclenet.model.device.mode_for_images`` picks PyNative for a handful of images;
and ``vehiclenet finetune`` of one step (384x384, batch 8, 16 generated images) from the
checkpoint, with its first step (graph compilation + the step) from its own report: the
first run compiles and files the training graph in the compile cache, later ones load it;
the same with ``VEHICLENET_COMPILE_CACHE=0`` (compiled every time) beside them.

The weights are a generated checkpoint in the published layout (random values, same
size: 273 entries, 105 MB), passed with ``--checkpoint`` so reading them is counted and
nothing is downloaded. Kernels already built for this machine are reused (built once
first if not); what is cold in the first run of each command is everything else.
Also the checks made before the two kernel libraries are loaded (ownership of every folder
down to them, their recorded sha256), timed in-process. Anchors, in the same run:
``python -c pass`` and ``python -c "import mindspore"``; every figure is also printed as a
ratio to the second.
"""
import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]

LIBRARY_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import mindspore as ms
import vehiclenet
from vehiclenet import create_network
t1 = time.perf_counter()
mode, ckpt, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
bare = create_network(pretrained=False, include_top=False, mode=mode) if ckpt == "-" else None
t2 = time.perf_counter()
net = bare if bare is not None else create_network(checkpoint=ckpt, include_top=False, mode=mode)
t3 = time.perf_counter()
x = ms.Tensor(__import__("numpy").zeros((1, 3, size, size), "float32"))
net(x).asnumpy()
t4 = time.perf_counter()
net(x).asnumpy()
t5 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "build": t2 - t1, "build_load": t3 - t2, "first_call": t4 - t3,
                  "second_call": t5 - t4}))
"""


MODES_CHILD = r"""
import json, sys, time
import numpy as np, mindspore as ms
from vehiclenet import create_network
net = create_network(checkpoint=sys.argv[2], include_top=False, mode=sys.argv[1])
out = {}
for b in (2, 8, 32):
    x = ms.Tensor(np.random.default_rng(0).standard_normal((b, 3, 384, 384)).astype(np.float32))
    t = time.perf_counter(); net(x).asnumpy(); first = time.perf_counter() - t
    steady = []
    for _ in range(3):
        t = time.perf_counter(); net(x).asnumpy(); steady.append(time.perf_counter() - t)
    out[b] = [first, min(steady)]
print(json.dumps(out))
"""


# What loading the kernels costs beyond dlopen (issue 28): the ownership rule on every folder
# from / down to the kernel folder, and each library and its record checked and hashed.
CHECKS_CHILD = r"""
import json, time
from vehiclenet import cache_trust, native
from vehiclenet.model import cpu_kernels
native.retrieval_kernels(), cpu_kernels.library_path()  # built (once per machine) and loaded
libraries = [native.find_built(native.RETRIEVAL_SOURCE, "retrieval_kernels", native.RETRIEVAL_FLAGS,
                               compiler_env="CC", default_compiler="cc"), cpu_kernels.built_library()]
start = time.perf_counter()
for library in libraries:
    cache_trust.private_folder(library.parent, library.parent, create=False)
    assert cache_trust.library_problem(library) is None
print(json.dumps({"checks_ms": (time.perf_counter() - start) * 1e3,
                  "bytes_hashed_MB": sum(p.stat().st_size for p in libraries) / 1e6}))
"""


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def run_measured(cmd: List[str], cwd: Path, env: Dict[str, str]) -> Tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stdout) of ``cmd`` in a fresh process: ``os.wait4`` reaps
    it ourselves, so the RSS is that child's own (RUSAGE_CHILDREN would be the maximum over all)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{errors[-2000:]}")
    return wall, usage.ru_maxrss / 1024, text


def prepare(work: Path) -> Dict[str, Any]:
    """One JPEG, a 1,000-row gallery file and a published-layout checkpoint of random weights."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    image = work / "0002_c002_00030600_0.jpg"
    Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(image, quality=90)
    feats = rng.standard_normal((1000, 512)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    gallery = work / "gallery.npz"
    np.savez(gallery, features=feats, paths=np.array([f"g/{i:04d}_c001_0_0.jpg" for i in range(1000)]))
    ckpt = work / "weights.ckpt"
    script = ("import mindspore as ms, sys; from vehiclenet.model.network import VehicleNet; "
              "ms.save_checkpoint(VehicleNet(num_classes=575), sys.argv[1])")
    subprocess.run([sys.executable, "-c", script, str(ckpt)], check=True, env=_env(work),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Scripts as files: MindSpore's compile cache reads the entry script (it cannot with -c).
    (work / "library_child.py").write_text(LIBRARY_CHILD)
    (work / "modes_child.py").write_text(MODES_CHILD)
    (work / "checks_child.py").write_text(CHECKS_CHILD)
    for identity in range(2):  # fine-tuning data: 2 identities, 8 images each
        folder = work / "train" / f"{identity + 1:04d}"
        folder.mkdir(parents=True)
        for i in range(8):
            pixels = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return {"train": work / "train", "checks": work / "checks_child.py", "image": image, "gallery": gallery, "ckpt": ckpt, "sha256": hashlib.sha256(ckpt.read_bytes()).hexdigest(),
            "library": work / "library_child.py", "modes": work / "modes_child.py"}


def _env(work: Path) -> Dict[str, str]:
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=str(ROOT))
    env["VEHICLENET_HOME"] = str(work / "home")  # a fresh cache folder: the first run is cold
    env.setdefault("VEHICLENET_KERNEL_CACHE", str(Path.home() / ".cache" / "vehiclenet" / "kernels"))
    return env


def commands(files: Dict[str, Any]) -> Dict[str, List[str]]:
    py, ckpt, library, modes = sys.executable, str(files["ckpt"]), str(files["library"]), str(files["modes"])
    cli = [py, "-m", "vehiclenet"]
    finetune = ["finetune", "--data", str(files["train"]), "--checkpoint", ckpt, "--epochs", "1", "--batch-size", "8",
                "--max-steps-per-epoch", "1", "--num-workers", "1", "--seed", "0"]
    return {
        "anchor: python -c pass": [py, "-c", "pass"],
        "anchor: import mindspore": [py, "-c", "import mindspore"],
        "embed (1 image)": cli + ["embed", "--checkpoint", ckpt, str(files["image"]), "--out", "one.npz"],
        "rank (1 query, 1,000 rows)": cli + ["rank", "--checkpoint", ckpt, "--query", str(files["image"]),
                                             "--gallery", str(files["gallery"]), "--no-picture"],
        "info": cli + ["info"],
        "verify (105 MB)": cli + ["verify", "--sha256", files["sha256"], ckpt],
        "library graph": [py, library, "graph", ckpt, "384"],
        "library pynative": [py, library, "pynative", ckpt, "384"],
        "library graph, random weights": [py, library, "graph", "-", "384"],
        "calls graph": [py, modes, "graph", ckpt],
        "calls pynative": [py, modes, "pynative", ckpt],
        "kernel library checks": [py, str(files["checks"])],
        "finetune (1 step)": cli + finetune + ["--out", "finetune-{run}"],
        "finetune (1 step), uncached": ["env", "VEHICLENET_COMPILE_CACHE=0"] + cli + finetune
                                       + ["--out", "uncached-{run}"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="runs of each command (the first is cold)")
    parser.add_argument("--only", metavar="REGEX", default="",
                        help="measure only the commands whose name matches (the anchors always run)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vn-cold-") as tmp:
        work = Path(tmp)
        files = prepare(work)
        env = _env(work)
        results = {}
        for name, cmd in commands(files).items():
            if not (name.startswith("anchor") or re.search(args.only, name)):
                continue
            runs = [run_measured([c.replace("{run}", str(i)) for c in cmd], work, env) for i in range(args.repeats)]
            results[name] = runs
        report(results)


def report(results) -> None:
    anchor = min(r[0] for r in results["anchor: import mindspore"])
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}")
    print(f"anchor: `python -c 'import mindspore'` {anchor:.2f} s (best run); ratios below are to it\n")
    print(f"{'what':34s} {'run':>4s} {'wall s':>8s} {'x anchor':>9s} {'peak RSS MB':>12s}  breakdown")
    for name, runs in results.items():
        for i, (wall, rss, out) in enumerate(runs, 1):
            extra = ""
            if name.startswith("library"):
                parts = json.loads(out.strip().splitlines()[-1])
                extra = "  ".join(f"{k} {v:.2f}" for k, v in parts.items())
            elif name == "kernel library checks":  # in-process: the checks alone, before the two dlopens
                parts = json.loads(out.strip().splitlines()[-1])
                extra = f"checks {parts['checks_ms']:.2f} ms over {parts['bytes_hashed_MB']:.2f} MB"
            elif name.startswith("finetune"):  # its own report: the first step includes compilation
                found = re.search(r"first step incl\. compilation ([0-9.]+) s", out)
                extra = f"first step {float(found.group(1)):.2f} s" if found else ""
            elif name.startswith("calls"):  # network calls on B images: first (compile + run) / steady
                parts = json.loads(out.strip().splitlines()[-1])
                extra = "  ".join(f"B={k}: {v[0]:.2f}/{v[1]:.2f}" for k, v in parts.items())
            print(f"{name:34s} {i:4d} {wall:8.2f} {wall / anchor:9.2f} {rss:12.0f}  {extra}")


if __name__ == "__main__":
    main()
