"""Embedding throughput of VehicleNet on this CPU: the ways a user runs it, beside ONNX Runtime
and OpenVINO, in one run, same weights, same batch.

    python benchmarks/cpu_runtimes.py [--batch-size 8] [--image-size 384] [--cycles 8] [--calls 2]
                                      [--quick] [--venv DIR] [--cpu native|avx2]

Measures images/s (fp32 input, batch 8, 384x384 by default) of

1. ``README call fp32``: exactly the README's Python example, in a fresh process (so in
   MindSpore's default PyNative mode): ``emb = create_network(include_top=False)`` with the
   published weights (a manifest whose default asset is this run's checkpoint, already in
   the cache: nothing is downloaded), then ``emb(ms.Tensor(x))``;
2. ``README call bf16``: the same with ``precision="bf16"`` (docs/cpu-kernels.md's bf16 call);
3. ``hub entry fp32``: what ``mindspore_hub.load(card, include_top=False)`` runs:
   ``mindspore_hub_conf.create_network("vehiclenet", include_top=False)`` then
   ``load_param_into_net(net, load_checkpoint(file))``, in the default mode;
4. ``embed fp32``: the network ``vehiclenet embed`` builds for a job of many images (the
   mode it picks for them) called as embed calls it, on the batch and its flip in one call
   (2 x batch images per call, counted as such);
5. ``graph fp32`` / ``graph bf16``: ``create_network(checkpoint=..., mode="graph")``, the
   tuned path of earlier rounds;
   ``README async fp32``: the README call with PyNative's asynchronous operator launch, as
   it ran before the network launched its operators synchronously (why it was slower);
6. ONNX Runtime fp32 (CPUExecutionProvider), OpenVINO f32 and bf16 (CPU plugin,
   ``INFERENCE_PRECISION_HINT``), all three on the ONNX file written by
   ``vehiclenet export --format ONNX``.

Weights are random (throughput does not depend on them) but the same everywhere: the
random network is saved to a checkpoint that every row and the export load. The input is
one seeded batch of random pixels normalised like real images. Every row lives in a process
of its own, started once: it builds its network and makes a first call (compilation,
reported apart) and a warm-up call. Then the rows take turns, each with all cores, in
``--cycles`` cycles (default 8, a new seeded order each cycle, a 1 s pause before each row
so that the previous row's spinning threads are quiet) of ``--calls`` timed calls
each (default 2): rows run seconds apart, not minutes, so a machine whose speed drifts (a
shared virtual machine: one runtime's rate varied by 40 % between runs minutes apart)
moves every row alike. A row's rate is the median over the cycles; its ratio to an anchor
is the median of the cycles' own ratios, printed with their range. OpenVINO runs one
synchronous request with ``PERFORMANCE_HINT=LATENCY``, like the other runtimes' one call per batch.

ONNX Runtime and OpenVINO are not package dependencies: they are installed into the
benchmark's own virtual environment (``<vehiclenet cache>/bench-venv``, created on the
first run, reused after) and run in child processes of it; the vehiclenet rows are children
of this Python (this file with ``--serve ROW``). A child answers one JSON line per request on
stdout. A row that cannot run here is reported as "not available" with its error; the
others are still measured.

``--cpu avx2`` runs every row as on an AVX2-only CPU of the same cores: the CPUID bits of
AVX-512, AVX512-BF16, AVX-VNNI and AMX hidden from each row's process (``emulated_cpu.py``), so
oneDNN, MindSpore, ONNX Runtime and OpenVINO all pick their AVX2 kernels (``DNNL_MAX_CPU_ISA``
would cap oneDNN and OpenVINO only). The bf16 rows are then not available, and "openvino bf16"
runs f32 (the anchor is kept: it is what OpenVINO does with a bf16 hint on such a CPU).

Also printed: the CPU model, which ISA/implementation each runtime uses where it says, the
vector extensions each row's CPUID reported,
per-image cosine between bf16 and fp32 features (vehiclenet, OpenVINO), and the largest
difference between vehiclenet fp32 and ONNX Runtime (a check that the weights are the same).
"""
import argparse
import json
import os
import platform
import random
import subprocess
import sys
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from emulated_cpu import avx2_only_env, cpuid_seen, unavailable

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
# Importing mindspore points LD_LIBRARY_PATH at its own libraries; the child runtimes and
# the export get the environment from before that import.
ENV_BEFORE_MINDSPORE = dict(os.environ)

BENCH_MODULES = ("numpy", "onnxruntime", "openvino")  # importable names == PyPI names here
VEHICLENET_RUNTIMES = ("README call fp32", "README call bf16", "hub entry fp32", "embed fp32", "graph fp32",
                       "graph bf16", "README async fp32")
CHILD_RUNTIMES = ("onnxruntime fp32", "openvino f32", "openvino bf16")
ANCHORS = ("onnxruntime fp32", "openvino bf16")  # every row's ratio to each, same run
SETTLE_SECONDS = 1.0  # before each row's calls: the previous row's threads have gone quiet (see take_turns)
# (runtime, reference, what the comparison shows)
AGREEMENT = (
    ("README call bf16", "README call fp32", "bf16 vs fp32"),
    ("openvino bf16", "openvino f32", "bf16 vs f32"),
    ("onnxruntime fp32", "README call fp32", "same weights?"),
    ("openvino f32", "README call fp32", "same weights?"),
    ("graph fp32", "README call fp32", "graph vs PyNative"),
    ("hub entry fp32", "README call fp32", "hub vs README"),
)
BENCH_ASSET = "bench-random"  # the manifest asset the README row's create_network() loads
Result = Dict[str, object]


# --------------------------------------------------------------------------- children


def prepared(call: Callable[[], np.ndarray], images: int, version: str, implementation: str) -> Result:
    """A row ready to be timed: its first call (compilation) and a warm-up call made."""
    start = time.perf_counter()
    features = np.asarray(call(), dtype=np.float32)
    first = time.perf_counter() - start
    call()  # warm-up after compilation: first-touch allocations, caches
    return {"call": call, "images_per_call": images, "first_call_s": first, "features": features,
            "version": version, "implementation": implementation, "cpuid": cpuid_seen()}


def serve(prepare: Callable[[], Result]) -> None:
    """A child's life: set up (one JSON line: its description, or its error), then for each
    number N read on stdin make N calls and answer their seconds; end at end-of-file."""
    try:
        row = prepare()
    except Exception as exc:  # reported by the parent as "not available"
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return
    call = row.pop("call")
    row["features"] = row["features"].tolist()
    print(json.dumps(row), flush=True)
    for line in sys.stdin:
        calls = int(line)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


def prepare_onnxruntime(onnx_path: str, x: np.ndarray) -> Result:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    # MLAS picks its kernels by CPUID at run time and has no API that names them.
    return prepared(lambda: session.run(None, {name: x})[0], len(x), f"onnxruntime {ort.__version__}",
                    f"{session.get_providers()[0]}, MLAS kernels (ISA not reported)")


def openvino_kernels(compiled) -> str:
    """Primitives and precisions of the compiled (runtime) model's convolutions and dense
    layer, e.g. ``17 Convolution brgconv_avx512_bf16 bf16``: what runs, not what was asked."""
    counts: Dict[str, int] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str)
        if layer in ("Convolution", "FullyConnected"):
            key = f"{layer} {info['primitiveType'].astype(str)} {info['runtimePrecision'].astype(str)}"
            counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {key}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def prepare_openvino(onnx_path: str, x: np.ndarray, precision: str) -> Result:
    import openvino as ov

    core = ov.Core()
    # The CPU plugin's default hint is bf16 on CPUs that have it: ask for each explicitly.
    compiled = core.compile_model(onnx_path, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def call() -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    return prepared(call, len(x), f"openvino {ov.get_version().split('-')[0]}", (
        f"execution precision {compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}; "
        f"{openvino_kernels(compiled)}; CPU capabilities "
        f"{' '.join(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}"))


def prepare_vehiclenet(row: str, checkpoint: str, x: np.ndarray) -> Result:
    """One vehiclenet row, in this (fresh) process: the network built and called as the row says."""
    import mindspore as ms

    precision = row.split()[-1]
    if row.startswith("README async"):
        # Diagnosis, not a way to run it: PyNative's asynchronous launch, as before the network
        # launched its operators synchronously (vehiclenet.model.device.synchronous_pynative).
        import contextlib

        import vehiclenet.model.device

        vehiclenet.model.device.synchronous_pynative = contextlib.nullcontext
        row = "README call fp32"
    tensor = ms.Tensor(x)
    images = len(x)
    if row.startswith("README call"):
        from vehiclenet import create_network  # the README's lines, with the manifest of this run

        emb = create_network(include_top=False) if precision == "fp32" else create_network(
            include_top=False, precision="bf16")
        call = lambda: emb(tensor).asnumpy()  # noqa: E731
    elif row.startswith("hub entry"):
        import mindspore_hub_conf  # what mindspore_hub.load runs, then its own weight loading

        hub = mindspore_hub_conf.create_network("vehiclenet", include_top=False)
        ms.load_param_into_net(hub, ms.load_checkpoint(checkpoint))
        call = lambda: hub(tensor).asnumpy()  # noqa: E731
    elif row.startswith("embed"):
        from vehiclenet.cli._network import build_network
        from vehiclenet.model.device import PYNATIVE_MAX_IMAGES, mode_for_images
        from vehiclenet.embedding.features import _run_net
        from vehiclenet.weights.choice import WeightsChoice

        net = build_network(WeightsChoice(checkpoint), precision, mode=mode_for_images(10 * PYNATIVE_MAX_IMAGES))
        call, images = (lambda: _run_net(net, x, flip=True)), 2 * len(x)
    else:
        from vehiclenet import create_network

        graph = create_network(pretrained=False, include_top=False, checkpoint=checkpoint, mode="graph",
                               precision=precision)
        call = lambda: graph(tensor).asnumpy()  # noqa: E731
    mode = "graph" if ms.get_context("mode") == ms.GRAPH_MODE else "PyNative"
    result = prepared(call, images, f"mindspore {ms.__version__}, {mode} mode",
                      vehiclenet_implementation(precision, images, *x.shape[2:]))
    result["features"] = result["features"][: len(x)]
    return result


def child_main(row: str, onnx_path: str, checkpoint: str, batch_path: str) -> None:
    """One row as a child process (``--serve ROW``)."""
    x = np.load(batch_path)
    if row == "onnxruntime fp32":
        serve(lambda: prepare_onnxruntime(onnx_path, x))
    elif row.startswith("openvino"):
        serve(lambda: prepare_openvino(onnx_path, x, row.split()[-1]))
    else:
        serve(lambda: prepare_vehiclenet(row, checkpoint, x))


# --------------------------------------------------------------------------- parent


class Child:
    """One row's process: started (it sets up and answers), then asked for its calls in turn."""

    def __init__(self, name: str, python: str, args: List[str], env: Dict[str, str]) -> None:
        self.name = name
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--serve", name, *args], env=env, cwd=REPO,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.rates: List[float] = []
        self.result: Result = self._answer()
        if "error" in self.result:
            self.close()
        else:
            self.result["features"] = np.asarray(self.result["features"], dtype=np.float32)

    def _answer(self) -> Result:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            return {"error": f"child process exited with {self.proc.returncode} (its stderr is above)"}
        return json.loads(line)

    def run(self, calls: int) -> Optional[float]:
        """Images per second over ``calls`` calls made now; None when the row is not available."""
        if "error" in self.result:
            return None
        self.proc.stdin.write(f"{calls}\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if "error" in answer:
            self.result = answer
            return None
        self.rates.append(calls * self.result["images_per_call"] / answer["seconds"])
        return self.rates[-1]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def take_turns(children: List[Child], cycles: int, calls: int) -> List[Dict[str, float]]:
    """``cycles`` cycles in which every row makes ``calls`` calls, in a new seeded order each
    cycle, after a pause; the rates of each cycle by row.

    A runtime's threads may keep a core busy for a while after its calls return (MindSpore's
    PyNative actor thread spun for ~0.15 s of CPU here): whichever row ran next would pay for
    it. Hence the pause, and an order in which no row always follows the same one (rotating
    the order would keep every row behind the same neighbour)."""
    per_cycle = []
    shuffler = random.Random(0)
    for cycle in range(cycles):
        order = list(children)
        shuffler.shuffle(order)
        rates = {}
        for child in order:
            print(f"cycle {cycle + 1}/{cycles}: {child.name} ...", file=sys.stderr)
            time.sleep(SETTLE_SECONDS)
            rate = child.run(calls)
            if rate is not None:
                rates[child.name] = rate
        per_cycle.append(rates)
    return per_cycle


def summarise(children: List[Child], per_cycle: List[Dict[str, float]]) -> Dict[str, Result]:
    """Each row's description with its median rate, and per anchor the median and range of
    the cycles' own ratios."""
    results: Dict[str, Result] = {}
    for child in children:
        result = dict(child.result)
        if "error" not in result and child.rates:
            result["img_per_s"] = statistics.median(child.rates)
            result["ratios"] = {}
            for anchor in ANCHORS:
                ratios = [c[child.name] / c[anchor] for c in per_cycle if child.name in c and anchor in c]
                if ratios:
                    result["ratios"][anchor] = (statistics.median(ratios), min(ratios), max(ratios))
        results[child.name] = result
    return results


def _ratio(result: Result, anchor: str) -> str:
    if anchor not in result["ratios"]:
        return "n/a"
    median, low, high = result["ratios"][anchor]
    return f"{median:.2f}x ({low:.2f}-{high:.2f})"


def print_throughput(results: Dict[str, Result], batch: int, cycles: int, calls: int) -> None:
    print(f"\n{'runtime':18s} {'img/s':>7s} {'ms/img':>7s} " + " ".join(f"{'vs ' + a:>22s}" for a in ANCHORS)
          + f" {'1st call':>9s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: not available: {r['error']}")
            continue
        ratios = " ".join(f"{_ratio(r, anchor):>22s}" for anchor in ANCHORS)
        print(f"{name:18s} {r['img_per_s']:7.2f} {1000 / r['img_per_s']:7.1f} {ratios} {r['first_call_s']:8.1f}s")
    print(f"(batch {batch}; {cycles} cycles of {calls} calls per row, taking turns; img/s: median over the cycles; "
          "ratios: median (range) of the cycles' own ratios; embed: the batch and its flip in one call, "
          f"2 x {batch} images; 1st call: compilation included, not timed)")
    print("\nwhat runs:")
    for name, r in results.items():
        if "error" not in r:
            print(f"  {name}: {r['version']}; {r['implementation']}; CPUID {r['cpuid']}")


def cpu_description() -> str:
    """``model name`` of /proc/cpuinfo and the ISA extensions that decide the kernels."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8")
    isa = " ".join(f for f in wanted if f in flags) or "flags unknown"
    return f"{model} ({isa}), {len(os.sched_getaffinity(0))} cores for this process"


def bench_python(venv: Path) -> Tuple[Optional[str], str]:
    """The bench venv's python with ONNX Runtime, OpenVINO and numpy, created and
    installed on first use; (None, why) when that fails."""
    python = venv / "bin" / "python"
    env = ENV_BEFORE_MINDSPORE
    if not python.exists():
        print(f"creating {venv} (first run) ...", file=sys.stderr)
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], env=env)
        if made.returncode != 0 or not python.exists():
            return None, f"python -m venv {venv} failed (exit {made.returncode})"
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps([m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]))")
    probed = subprocess.run([str(python), "-c", probe, *BENCH_MODULES], env=env, capture_output=True, text=True)
    if probed.returncode != 0:  # e.g. a venv whose base python was removed: delete it to rebuild
        return None, f"{python} does not run ({probed.stderr.strip()[-300:]}); remove {venv} to recreate it"
    missing = json.loads(probed.stdout)
    failed = []
    for module in missing:  # one at a time, so that one failing install leaves the others
        print(f"pip install {module} into {venv} ...", file=sys.stderr)
        pip = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", module],
                             env=env, stdout=sys.stderr)
        if pip.returncode != 0:
            failed.append(f"pip install {module} failed (exit {pip.returncode})")
    return str(python), "; ".join(failed)


def save_random_weights(path: Path) -> Path:
    """One random network's weights (head included, as a published checkpoint), for every runtime."""
    import mindspore as ms

    from vehiclenet import create_network

    ms.set_seed(0)
    ms.save_checkpoint(create_network(pretrained=False, include_top=True), str(path))
    return path


def export_onnx(checkpoint: Path, out: Path, batch: int, image_size: int) -> Path:
    """The ONNX file as a user gets it: the package's CLI, in its own process."""
    env = dict(ENV_BEFORE_MINDSPORE, PYTHONPATH=os.pathsep.join(
        p for p in (REPO, ENV_BEFORE_MINDSPORE.get("PYTHONPATH")) if p))
    done = subprocess.run([sys.executable, "-m", "vehiclenet", "export", "--format", "ONNX", "--out", str(out),
                           "--checkpoint", str(checkpoint), "--batch-size", str(batch),
                           "--image-size", str(image_size)],
                          env=env, check=True, stdout=subprocess.PIPE, text=True)
    return Path(done.stdout.strip().splitlines()[-1])  # the CLI's last line is the file written


def make_batch(batch: int, image_size: int) -> np.ndarray:
    """Seeded random pixels normalised as real images are (vehiclenet.embedding.preprocessing)."""
    from vehiclenet.embedding.preprocessing import MEAN, STD

    pixels = np.random.default_rng(0).uniform(0, 255, (batch, 3, image_size, image_size))
    mean, std = np.array(MEAN).reshape(1, 3, 1, 1), np.array(STD).reshape(1, 3, 1, 1)
    return ((pixels - mean) / std).astype(np.float32)


def vehiclenet_implementation(precision: str, batch: int, height: int, width: int) -> str:
    """The oneDNN implementations that run the network's whole-backbone op on this input."""
    from vehiclenet.model.cpu_kernels import backbone_implementations, library_path

    library = library_path()
    if library is None:
        return "MindSpore's Conv2D (oneDNN kernels unavailable)"
    return backbone_implementations(library, batch, height, width, bf16=precision == "bf16")


def bench_manifest(checkpoint: Path, home: Path) -> Path:
    """A manifest whose default asset is ``checkpoint``, placed verified in the cache ``home``:
    ``create_network()`` then loads it as it loads the published weights, offline."""
    import hashlib

    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    home.mkdir(parents=True, exist_ok=True)
    (home / checkpoint.name).write_bytes(checkpoint.read_bytes())
    manifest = home.parent / "bench-assets.json"
    manifest.write_text(json.dumps({"schema": 1, "assets": [{
        "name": BENCH_ASSET, "file": checkpoint.name, "sha256": sha, "num_classes": 575,
        "urls": ["https://example.invalid/never-fetched.ckpt"]}]}))
    return manifest


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image cosine similarity of two (N, D) feature matrices."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def print_agreement(results: Dict[str, Result]) -> None:
    print("\nfeature agreement on the same batch (per-image cosine; max abs difference / largest |feature|):")
    for name, reference, what in AGREEMENT:
        a, b = results.get(name, {}).get("features"), results.get(reference, {}).get("features")
        label = f"{name} vs {reference} ({what})"
        if a is None or b is None:
            missing = name if a is None else reference
            print(f"  {label}: n/a ({missing} not available)")
            continue
        cos, diff = cosine(a, b), np.abs(a - b).max()
        print(f"  {label}: cosine min {cos.min():.6f} mean {cos.mean():.6f}; "
              f"max abs diff {diff:.3g} / {np.abs(b).max():.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--cycles", type=int, default=8, help="turns every row takes (default 8)")
    parser.add_argument("--calls", type=int, default=2, help="timed calls per row and turn (default 2)")
    parser.add_argument("--quick", action="store_true", help="3 cycles of 1 call (a trial run)")
    parser.add_argument("--venv", type=Path, default=None,
                        help="venv for ONNX Runtime and OpenVINO (default <vehiclenet cache>/bench-venv)")
    parser.add_argument("--cpu", choices=("native", "avx2"), default="native",
                        help="avx2: every row as on an AVX2-only CPU (CPUID bits of AVX-512, AVX512-BF16, "
                             "AVX-VNNI and AMX hidden; needs Linux CPUID faulting)")
    parser.add_argument("--serve", choices=(*VEHICLENET_RUNTIMES, *CHILD_RUNTIMES), help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return child_main(args.serve, args.onnx, args.checkpoint, args.batch_file)
    cycles, calls = (3, 1) if args.quick else (args.cycles, args.calls)
    if args.cpu == "avx2" and unavailable():
        parser.error(f"--cpu avx2: {unavailable()}")

    from vehiclenet import env

    # Other processes on the same cores skew every row: the load before the run tells.
    print(f"CPU: {cpu_description()}; load average {os.getloadavg()[0]:.2f} before the run")
    if args.cpu == "avx2":
        print("rows run as on an AVX2-only CPU: AVX-512, AVX512-BF16, AVX-VNNI and AMX hidden from their CPUID")
    print(f"input: batch {args.batch_size}, 3x{args.image_size}x{args.image_size} float32; {cycles} cycles of "
          f"{calls} timed calls per row; random weights, the same checkpoint for all")
    venv = args.venv or env.cache_dir() / "bench-venv"
    python, venv_error = bench_python(venv)  # before any timing: a first run installs for a while
    print(f"bench venv: {venv}" + (f" ({venv_error})" if venv_error else ""))

    with tempfile.TemporaryDirectory(prefix="vehiclenet-cpu-runtimes-") as tmp:
        checkpoint = save_random_weights(Path(tmp) / "random.ckpt")
        onnx_path = export_onnx(checkpoint, Path(tmp) / "model.onnx", args.batch_size, args.image_size)
        batch_path = Path(tmp) / "batch.npy"
        np.save(batch_path, make_batch(args.batch_size, args.image_size))
        files = ["--onnx", str(onnx_path), "--checkpoint", str(checkpoint), "--batch-file", str(batch_path)]
        # The README row finds "the published weights" (this run's checkpoint) in its cache, offline;
        # the kernels are the user's, built once per machine.
        vehiclenet_env = dict(ENV_BEFORE_MINDSPORE, PYTHONPATH=os.pathsep.join(
            p for p in (REPO, ENV_BEFORE_MINDSPORE.get("PYTHONPATH")) if p),
            VEHICLENET_ASSETS=str(bench_manifest(checkpoint, Path(tmp) / "home")),
            VEHICLENET_HOME=str(Path(tmp) / "home"), VEHICLENET_OFFLINE="1",
            VEHICLENET_KERNEL_CACHE=str(env.kernel_dir()), GLOG_v="3")
        if args.cpu == "avx2":
            vehiclenet_env = avx2_only_env(vehiclenet_env, Path(tmp))
        child_env = avx2_only_env(ENV_BEFORE_MINDSPORE, Path(tmp)) if args.cpu == "avx2" else ENV_BEFORE_MINDSPORE
        children = []
        try:
            for name in VEHICLENET_RUNTIMES:
                print(f"starting {name} ...", file=sys.stderr)
                children.append(Child(name, sys.executable, files, vehiclenet_env))
            for name in CHILD_RUNTIMES:
                print(f"starting {name} ...", file=sys.stderr)
                children.append(Child(name, python, files, child_env) if python else None)
            children = [c for c in children if c is not None]
            per_cycle = take_turns(children, cycles, calls)
        finally:
            for child in children:
                child.close()
    results = summarise(children, per_cycle)
    if args.cpu == "avx2":
        for name, result in results.items():  # a row that saw AVX-512 would not be this comparison
            if "AVX512" in result.get("cpuid", ""):
                results[name] = {"error": f"its CPUID still reported {result['cpuid']} (mask not in effect)"}
    for name in CHILD_RUNTIMES:
        results.setdefault(name, {"error": venv_error})
    print_throughput(results, args.batch_size, cycles, calls)
    print_agreement(results)


if __name__ == "__main__":
    main()
