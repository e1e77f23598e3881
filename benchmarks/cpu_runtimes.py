"""Embedding throughput of VehicleNet on this CPU in five runtimes, one run, same weights, same batch.

    python benchmarks/cpu_runtimes.py [--batch-size 8] [--image-size 384] [--seconds 20] [--quick]
                                      [--venv DIR]

Measures images/s (fp32 input, batch 8, 384x384 by default) of

1. vehiclenet fp32: ``create_network(precision="fp32")``, graph mode, oneDNN kernels;
2. vehiclenet bf16: ``create_network(precision="bf16")``;
3. ONNX Runtime fp32 (CPUExecutionProvider),
4. OpenVINO f32 and 5. OpenVINO bf16 (CPU plugin, ``INFERENCE_PRECISION_HINT``),
   all three on the ONNX file written by ``vehiclenet export --format ONNX``.

Weights are random (throughput does not depend on them) but the same everywhere: the
random network is saved to a checkpoint that both ``create_network(checkpoint=...)`` and
the export load. The input is one seeded batch of random pixels normalised like real
images. Each runtime gets a first call (compilation, reported apart), one warm-up call,
then ``--seconds`` of timed calls on that batch (``--quick``: 3 s); the ratio column is
relative to vehiclenet fp32 of the same run. Runtimes are timed one after the other,
never at the same time, each with all cores; OpenVINO runs one synchronous request with
``PERFORMANCE_HINT=LATENCY``, like the other runtimes' one call per batch.

ONNX Runtime and OpenVINO are not package dependencies: they are installed into the
benchmark's own virtual environment (``<vehiclenet cache>/bench-venv``, created on the
first run, reused after) and run in child processes of it (this file with ``--child``),
which answer with JSON on stdout. A runtime that cannot run here is reported as "not
available" with its error; the others are still measured.

Also printed: the CPU model, which ISA/implementation each runtime uses where it says,
per-image cosine between bf16 and fp32 features (vehiclenet, OpenVINO), and the largest
difference between vehiclenet fp32 and ONNX Runtime (a check that the weights are the same).
"""
import argparse
import gc
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import numpy as np

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, REPO)
# Importing mindspore points LD_LIBRARY_PATH at its own libraries; the child runtimes and
# the export get the environment from before that import.
ENV_BEFORE_MINDSPORE = dict(os.environ)

BENCH_MODULES = ("numpy", "onnxruntime", "openvino")  # importable names == PyPI names here
VEHICLENET_RUNTIMES = {"vehiclenet fp32": "fp32", "vehiclenet bf16": "bf16"}
CHILD_RUNTIMES = ("onnxruntime fp32", "openvino f32", "openvino bf16")
BASELINE = "vehiclenet fp32"
# (runtime, reference, what the comparison shows)
AGREEMENT = (
    ("vehiclenet bf16", "vehiclenet fp32", "bf16 vs fp32"),
    ("openvino bf16", "openvino f32", "bf16 vs f32"),
    ("onnxruntime fp32", "vehiclenet fp32", "same weights?"),
    ("openvino f32", "vehiclenet fp32", "same weights?"),
)
Result = Dict[str, object]


# --------------------------------------------------------------------------- shared


def measure(run: Callable[[], np.ndarray], batch: int, seconds: float) -> Result:
    """Time ``run`` (one batch per call): the first call apart (it compiles), one warm-up
    call, then calls for ``seconds`` (at least 3). Returns the rate and the first output."""
    start = time.perf_counter()
    features = np.asarray(run(), dtype=np.float32)
    first = time.perf_counter() - start
    run()  # warm-up after compilation: first-touch allocations, caches
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        run()
        calls += 1
    elapsed = time.perf_counter() - start
    return {"img_per_s": calls * batch / elapsed, "images": calls * batch, "elapsed_s": elapsed,
            "first_call_s": first, "features": features}


# --------------------------------------------------------------------------- child (bench venv)


def run_onnxruntime(onnx_path: str, x: np.ndarray, seconds: float) -> Result:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    result = measure(lambda: session.run(None, {name: x})[0], len(x), seconds)
    result["version"] = f"onnxruntime {ort.__version__}"
    # MLAS picks its kernels by CPUID at run time and has no API that names them.
    result["implementation"] = f"{session.get_providers()[0]}, MLAS kernels (ISA not reported)"
    return result


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


def run_openvino(onnx_path: str, x: np.ndarray, seconds: float, precision: str) -> Result:
    import openvino as ov

    core = ov.Core()
    # The CPU plugin's default hint is bf16 on CPUs that have it: ask for each explicitly.
    compiled = core.compile_model(onnx_path, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                     "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run() -> np.ndarray:
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()

    result = measure(run, len(x), seconds)
    result["version"] = f"openvino {ov.get_version().split('-')[0]}"
    result["implementation"] = (
        f"execution precision {compiled.get_property('INFERENCE_PRECISION_HINT').get_type_name()}; "
        f"{openvino_kernels(compiled)}; CPU capabilities "
        f"{' '.join(core.get_property('CPU', 'OPTIMIZATION_CAPABILITIES'))}")
    return result


def child_main(runtime: str, onnx_path: str, batch_path: str, seconds: float) -> None:
    """Measure one runtime and print its result as one JSON line (features as lists)."""
    x = np.load(batch_path)
    try:
        if runtime == "onnxruntime fp32":
            result = run_onnxruntime(onnx_path, x, seconds)
        else:
            result = run_openvino(onnx_path, x, seconds, runtime.split()[-1])
        result["features"] = result["features"].tolist()
    except Exception as exc:  # reported by the parent as "not available"
        result = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result))


# --------------------------------------------------------------------------- parent


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
    """Seeded random pixels normalised as real images are (vehiclenet.preprocessing)."""
    from vehiclenet.preprocessing import MEAN, STD

    pixels = np.random.default_rng(0).uniform(0, 255, (batch, 3, image_size, image_size))
    mean, std = np.array(MEAN).reshape(1, 3, 1, 1), np.array(STD).reshape(1, 3, 1, 1)
    return ((pixels - mean) / std).astype(np.float32)


def vehiclenet_implementation(precision: str, batch: int, height: int, width: int) -> str:
    """The oneDNN implementations that run the network's whole-backbone op on this input."""
    from vehiclenet.cpu_kernels import backbone_implementations, library_path

    library = library_path()
    if library is None:
        return "MindSpore's Conv2D (oneDNN kernels unavailable)"
    return backbone_implementations(library, batch, height, width, bf16=precision == "bf16")


def run_vehiclenet(checkpoint: Path, x: np.ndarray, seconds: float, precision: str) -> Result:
    import mindspore as ms

    from vehiclenet import create_network

    # Until create_network has precision=, fp32 is its only path: call it without; bf16
    # then fails with create_network's own TypeError, which the report prints.
    has_precision = "precision" in inspect.signature(create_network).parameters
    kwargs = {"precision": precision} if has_precision or precision != "fp32" else {}
    net = create_network(pretrained=False, include_top=False, checkpoint=str(checkpoint), mode="graph", **kwargs)
    tensor = ms.Tensor(x)
    result = measure(lambda: net(tensor).asnumpy(), len(x), seconds)
    result["version"] = f"mindspore {ms.__version__}"
    result["implementation"] = vehiclenet_implementation(precision, *x.shape[:1], *x.shape[2:])
    return result


def run_child(python: str, runtime: str, onnx_path: Path, batch_path: Path, seconds: float) -> Result:
    """One runtime in its own process of the bench venv; its last stdout line is the JSON result."""
    done = subprocess.run([python, os.path.abspath(__file__), "--child", runtime, "--onnx", str(onnx_path),
                           "--batch-file", str(batch_path), "--seconds", str(seconds)],
                          env=ENV_BEFORE_MINDSPORE, stdout=subprocess.PIPE, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"child process exited with {done.returncode} (its stderr is above)"}
    result = json.loads(lines[-1])
    if "features" in result:
        result["features"] = np.asarray(result["features"], dtype=np.float32)
    return result


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image cosine similarity of two (N, D) feature matrices."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def print_throughput(results: Dict[str, Result], batch: int) -> None:
    base = results.get(BASELINE, {}).get("img_per_s")
    print(f"\n{'runtime':18s} {'img/s':>7s} {'ms/img':>7s} {'vs ' + BASELINE:>20s} {'1st call':>9s}  "
          f"{'timed':>18s}")
    for name, r in results.items():
        if "error" in r:
            print(f"{name}: not available: {r['error']}")
            continue
        ratio = f"{r['img_per_s'] / base:.2f}x" if base else "n/a"
        timed = f"{r['images']} img in {r['elapsed_s']:.1f} s"
        print(f"{name:18s} {r['img_per_s']:7.2f} {1000 / r['img_per_s']:7.1f} {ratio:>20s} "
              f"{r['first_call_s']:8.1f}s  {timed:>18s}")
    print(f"(batch {batch}; 1st call: compilation included, not timed)")
    print("\nwhat runs:")
    for name, r in results.items():
        if "error" not in r:
            print(f"  {name}: {r['version']}; {r['implementation']}")


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
    parser.add_argument("--seconds", type=float, default=20.0, help="timed seconds per runtime (default 20)")
    parser.add_argument("--quick", action="store_true", help="3 timed seconds per runtime (a trial run)")
    parser.add_argument("--venv", type=Path, default=None,
                        help="venv for ONNX Runtime and OpenVINO (default <vehiclenet cache>/bench-venv)")
    parser.add_argument("--child", choices=CHILD_RUNTIMES, help=argparse.SUPPRESS)
    parser.add_argument("--onnx", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args.child, args.onnx, args.batch_file, args.seconds)
    seconds = 3.0 if args.quick else args.seconds

    from vehiclenet.download import cache_dir

    # Other processes on the same cores skew every row: the load before the run tells.
    print(f"CPU: {cpu_description()}; load average {os.getloadavg()[0]:.2f} before the run")
    print(f"input: batch {args.batch_size}, 3x{args.image_size}x{args.image_size} float32; "
          f"{seconds:g} s timed per runtime; random weights, the same checkpoint for all")
    venv = args.venv or cache_dir() / "bench-venv"
    python, venv_error = bench_python(venv)  # before any timing: a first run installs for a while
    print(f"bench venv: {venv}" + (f" ({venv_error})" if venv_error else ""))

    results: Dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="vehiclenet-cpu-runtimes-") as tmp:
        checkpoint = save_random_weights(Path(tmp) / "random.ckpt")
        onnx_path = export_onnx(checkpoint, Path(tmp) / "model.onnx", args.batch_size, args.image_size)
        x = make_batch(args.batch_size, args.image_size)
        batch_path = Path(tmp) / "batch.npy"
        np.save(batch_path, x)
        for name, precision in VEHICLENET_RUNTIMES.items():
            print(f"timing {name} ...", file=sys.stderr)
            try:
                results[name] = run_vehiclenet(checkpoint, x, seconds, precision)
            except Exception as exc:  # one runtime failing must not cost the others' figures
                results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            gc.collect()  # the network's weights and workspaces go before the next runtime's
        for name in CHILD_RUNTIMES:
            print(f"timing {name} ...", file=sys.stderr)
            results[name] = (run_child(python, name, onnx_path, batch_path, seconds) if python
                             else {"error": venv_error})
    print_throughput(results, args.batch_size)
    print_agreement(results)


if __name__ == "__main__":
    main()
