"""download, verify and info: none imports mindspore except `info` (for the device)."""
import argparse
import logging
import sys
from typing import Any, Dict, List, Optional

from .. import __version__
from ._common import add_command, emit, progress


def add_asset_commands(sub: "argparse._SubParsersAction") -> None:
    p = add_command(
        sub, "download",
        json_help="print the verified file's path as one JSON object",
        help="fetch an asset into the cache and verify its sha256",
        description="Download an asset of the manifest (default: the published checkpoint) into the cache, "
        "verifying its sha256. The last line of stdout is the file's path.",
    )
    p.add_argument("name", nargs="?", help="asset name (default: the manifest's first asset)")
    p.add_argument("--force", action="store_true", help="download again even if a verified copy is cached")
    p.set_defaults(func=_cmd_download)

    p = add_command(
        sub, "verify",
        json_help="print the results as JSON on stdout",
        help="check files (default: every cached asset) against the manifest's sha256",
        description="Check files against their sha256, like `sha256sum -c`. A file is matched to the manifest "
        "by its name; --sha256 gives the expected hash instead. Exit 0 all good, 1 any mismatch or "
        "missing file, 2 usage or manifest errors.",
    )
    p.add_argument("files", nargs="*", metavar="FILE", help="files to check (default: every cached asset)")
    p.add_argument("--sha256", metavar="HEX", help="expected sha256 for the FILEs instead of the manifest's")
    p.set_defaults(func=_cmd_verify)

    p = add_command(
        sub, "info",
        json_help="print the report as JSON on stdout",
        help="versions, device, cache folder and cached assets",
        description="Report versions, the device that would be chosen, the cache folder and which assets are "
        "cached and verified.",
    )
    p.add_argument(
        "--no-device", action="store_true",
        help="do not import mindspore to find the device, nor compile the CPU kernels (faster)"
    )
    p.set_defaults(func=_cmd_info)


def _cmd_download(args: argparse.Namespace) -> int:
    from ..weights.download import fetch
    from ..interrupts import doing, kept

    if args.quiet:
        logging.getLogger("vehiclenet").setLevel(logging.WARNING)
    if not args.verbose:
        # urllib3 logs every retry with its internal state; our own messages say what failed.
        logging.getLogger("urllib3").setLevel(logging.ERROR)
    doing(f"downloading {args.name or 'the default asset'}")
    kept("what was downloaded stays in the cache as <file>.part; the next download resumes it")
    path = fetch(args.name, force=args.force, progress=progress(args))
    emit(args, [str(path)], {"path": str(path), "asset": args.name})
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    import json

    from ..env import cache_dir
    from ..errors import UsageError
    from ..weights.verify import MISSING, verify_cache, verify_files

    if args.files:
        results = verify_files(args.files, sha256=args.sha256)
    elif args.sha256:
        raise UsageError("--sha256 needs at least one FILE to check")
    else:
        results = verify_cache()
    ok = bool(results) and all(r.ok for r in results)
    message = "" if results else (
        f"no cached assets in {cache_dir()}; run `vehiclenet download` or give FILE arguments"
    )
    if args.json:
        print(json.dumps({"ok": ok, "results": [r.to_dict() for r in results], "message": message}, indent=2))
        return 0 if ok else 1
    if message:
        print(f"vehiclenet verify: {message}", file=sys.stderr)
        return 1
    failed = 0
    for r in results:
        if r.ok:
            if not args.quiet:
                print(f"{r.path}: OK", flush=True)
            continue
        failed += 1
        print(f"{r.path}: FAILED{' open or read' if r.status == MISSING else ''}", flush=True)
        what, _, todo = r.message.partition("; ")
        lines = [f"{r.path}: {what}"]
        if r.asset:
            lines.append(f"  asset:    {r.asset}")
        if r.status != MISSING:
            if r.got is not None:
                lines += [f"  expected: {r.expected}", f"  got:      {r.got}"]
            else:
                lines += [f"  expected: {r.expected_size} bytes (sha256 {r.expected})", f"  got:      {r.size} bytes"]
        if todo:
            lines.append(f"  to fix:   {todo}")
        print("\n".join(lines), file=sys.stderr, flush=True)
    if failed:
        print(f"vehiclenet verify: WARNING: {failed} of {len(results)} file(s) did NOT verify", file=sys.stderr)
        return 1
    return 0


def _describe_blas(lib: dict) -> str:
    """``OpenBLAS 0.3.30 (libscipy_openblas), SkylakeX kernel`` from a threadpoolctl entry."""
    name = {"openblas": "OpenBLAS", "mkl": "MKL", "blis": "BLIS"}.get(str(lib.get("internal_api")), lib.get("internal_api"))
    kernel = f", {lib['architecture']} kernel" if lib.get("architecture") else ""
    return f"{name} {lib.get('version')} ({lib.get('prefix')}){kernel}"


def _cmd_info(args: argparse.Namespace) -> int:
    import json

    from .. import env
    from ..weights.assets import manifest_path, redact_url
    from ..retrieval.blas import blas_libraries, evaluation_blas
    from ..model.cpu_kernels import bf16_status
    from ..model.cpu_kernels import status as cpu_kernels_status

    report = {
        "versions": _info_versions(),
        "device": "not checked (--no-device)" if args.no_device else _info_device(),
        # What CPU inference convolves with (no mindspore import). --no-device promises a quick
        # look: it reports the kernels without compiling them; otherwise they are built if needed.
        "cpu_kernels": cpu_kernels_status(build=not args.no_device),
        "bf16": bf16_status(build=not args.no_device),
        "blas": {"evaluation": evaluation_blas(), "loaded": blas_libraries()},
        "manifest": str(manifest_path()),
        "cache": str(env.cache_dir()),
        "cache_source": env.HOME if env.is_set(env.HOME) else "platform user cache folder",
        "offline": env.offline(),
        "mirror": redact_url(env.mirror()) or None,
        "assets": _info_assets(),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_info(report)
    return 0


def _info_versions() -> Dict[str, Optional[str]]:
    import platform
    from importlib import metadata

    versions: Dict[str, Optional[str]] = {"vehiclenet": __version__, "python": platform.python_version()}
    for dist in ("mindspore", "numpy", "requests", "urllib3", "filelock", "platformdirs", "tqdm", "Pillow", "scipy",
                 "onednn-cpu-gomp", "faiss-cpu"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def _info_device() -> str:
    import os

    # MindSpore warns about every missing device plugin while probing; the report below
    # says what was chosen, so keep its log to errors unless the user set GLOG_v.
    os.environ.setdefault("GLOG_v", "3")
    try:
        from ..model.device import choose_device
        from ..interrupts import import_mindspore

        import_mindspore()
        return choose_device()
    except Exception as exc:  # info must report, not crash, on a broken install
        return f"unknown ({type(exc).__name__}: {exc})"


def _info_assets() -> List[Dict[str, Any]]:
    from ..weights.assets import load_manifest
    from ..weights.download import cached_path
    from ..weights.verify import check_file

    assets = []
    for i, asset in enumerate(load_manifest()):
        path = cached_path(asset)
        entry = {"name": asset.name, "default": i == 0, "file": asset.file, "path": str(path), "cached": path.exists()}
        if path.exists():
            result = check_file(path, asset.sha256, asset)
            entry.update(verified=result.ok, size=result.size, problem=result.message or None)
        assets.append(entry)
    return assets


def _print_info(report: Dict[str, Any]) -> None:
    from .. import env

    blas = report["blas"]
    _say("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items()))
    _say(f"device:   {report['device']}")
    _say(f"cpu convolutions: {report['cpu_kernels']}")
    _say(f"bf16 inference: {report['bf16']}")
    _say(f"evaluation BLAS: {_describe_blas(blas['evaluation'])}; also loaded: "
          + ", ".join(_describe_blas(lib) for lib in blas["loaded"] if lib != blas["evaluation"]))
    _say(f"manifest: {report['manifest']}")
    _say(f"cache:    {report['cache']} ({report['cache_source']})")
    network = f"off ({env.OFFLINE}=1)" if report["offline"] else f"allowed, not checked ({env.OFFLINE}=1 turns it off)"
    _say(f"network:  {network}"
          + (f", mirror {report['mirror']}" if report["mirror"] else ""))
    _say("assets:")
    for a in report["assets"]:
        state = "not cached"
        if a["cached"] and a["size"] is None:  # something that is not a file sits at the cache path
            state = f"FAILED: {a['problem']}"
        elif a["cached"]:
            state = f"cached, {a['size']} bytes, " + ("verified OK" if a["verified"] else f"FAILED: {a['problem']}")
        _say(f"  {a['name']}{' (default)' if a['default'] else ''}: {state}")
        _say(f"    {a['path']}")


def _say(line: str) -> None:
    """Print one line of ``info``: characters a setting may carry (a newline in VEHICLENET_HOME,
    an escape sequence) are shown escaped, so each line stays one line."""
    print("".join(c if c.isprintable() else repr(c)[1:-1] for c in line))
