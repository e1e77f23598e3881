"""Processes that see this CPU as an AVX2-only one (no AVX-512, AVX512-BF16, AVX-VNNI, AMX).

The runtimes compared by ``cpu_runtimes.py`` each pick their kernels by CPUID when they load,
and only oneDNN can be capped by a setting (``DNNL_MAX_CPU_ISA``): ONNX Runtime's MLAS cannot.
``cpuid_mask.c``, preloaded into a process, hides those CPUID bits from everything in it (see
its comment), so every runtime runs its AVX2 kernels on the same cores: a fair comparison of
the kinds of CPU the machine can stand in for. It needs Linux's CPUID faulting (the
``cpuid_fault`` flag: Intel since Ivy Bridge, AMD since Zen 4, also under KVM) and a C compiler.
"""
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Mapping, Optional

SOURCE = Path(__file__).with_name("cpuid_mask.c")
# glibc reads CPUID before any preloaded library runs: its own string functions are told apart.
GLIBC_HIDDEN = "-AVX512F,-AVX512CD,-AVX512BW,-AVX512DQ,-AVX512VL"  # glibc.cpu.hwcaps names glibc 2.36 knows
HWCAPS = "glibc.cpu.hwcaps="


class Unavailable(RuntimeError):
    """This machine cannot run a process as on an AVX2-only CPU (the reason is the message)."""


def unavailable() -> Optional[str]:
    """Why processes cannot be run as on an AVX2-only CPU here; None when they can."""
    flags = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError as exc:
        return f"cannot read /proc/cpuinfo ({exc}): CPUID faulting needs Linux"
    if "avx2" not in flags:
        return "this CPU has no AVX2"
    if "cpuid_fault" not in flags:
        return "this CPU or kernel has no CPUID faulting (no cpuid_fault flag in /proc/cpuinfo)"
    if shutil.which(os.environ.get("CC", "cc")) is None:
        return f"no C compiler {os.environ.get('CC', 'cc')!r} on PATH to build {SOURCE.name}"
    return None


def avx2_only_env(env: Mapping[str, str], build_dir: Path) -> Dict[str, str]:
    """``env`` for a process that sees this CPU as an AVX2-only one: the mask is built into
    ``build_dir`` and preloaded (before anything the caller preloads). Raises Unavailable where
    the machine cannot do it, RuntimeError when the mask does not build."""
    why = unavailable()
    if why:
        raise Unavailable(f"cannot run as an AVX2-only CPU: {why}")
    library = Path(build_dir) / "libcpuid_mask.so"
    built = subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", str(SOURCE), "-o", str(library),
                            "-ldl"], capture_output=True, text=True)
    if built.returncode != 0:
        raise RuntimeError(f"cannot build {SOURCE}: {built.stderr.strip()[-500:]}")
    preload = " ".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    masked = dict(env, LD_PRELOAD=preload, GLIBC_TUNABLES=_with_hidden_hwcaps(env.get("GLIBC_TUNABLES", "")))
    # The flag says the CPU can; a sandbox (seccomp, gVisor) may still refuse the arch_prctl.
    tried = subprocess.run(["true"], env=masked, capture_output=True, text=True)
    if tried.returncode != 0:
        raise Unavailable(f"cannot run as an AVX2-only CPU: {tried.stderr.strip()[-300:] or f'exit {tried.returncode}'}")
    return masked


def _with_hidden_hwcaps(tunables: str) -> str:
    """GLIBC_TUNABLES with the AVX-512 hwcaps hidden, added to a glibc.cpu.hwcaps already set."""
    parts = [t for t in tunables.split(":") if t]
    for i, part in enumerate(parts):
        if part.startswith(HWCAPS):
            parts[i] = f"{part},{GLIBC_HIDDEN}" if part != HWCAPS else HWCAPS + GLIBC_HIDDEN
            return ":".join(parts)
    return ":".join(parts + [HWCAPS + GLIBC_HIDDEN])


def cpuid_seen() -> str:
    """The vector extensions this process's CPUID reports, as numpy read it: e.g.
    ``AVX2 AVX512F AVX512VNNI``, or ``AVX2`` in a process run by :func:`avx2_only_env`."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features
    names = ("AVX2", "AVX512F", "AVX512VNNI", "AVX512FP16")
    return " ".join(n for n in names if features.get(n)) or "no AVX2"
