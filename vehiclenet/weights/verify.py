"""Checking files against the manifest's sha256 (the logic behind ``vehiclenet verify``).

No network and no heavy imports: this runs in a process that must start fast.
"""
import os
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from .assets import SHA256_HEX, Asset, find_asset_for_file, load_manifest, manifest_path
from .download import cache_dir, cached_path, not_a_file_problem
from ..fileio import sha256_file
from ..errors import UsageError
from ..fileio import describe_entry

OK = "OK"
FAILED = "FAILED"
MISSING = "MISSING"


@dataclass
class VerifyResult:
    """Outcome of checking one file."""

    path: str
    status: str  # OK, FAILED (wrong size or hash) or MISSING (cannot be read)
    expected: str
    got: Optional[str] = None
    asset: Optional[str] = None
    size: Optional[int] = None
    expected_size: Optional[int] = None
    seconds: float = 0.0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_dict(self) -> Dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def check_file(
    path: Union[str, os.PathLike], expected: str, asset: Optional[Asset] = None
) -> VerifyResult:
    """Hash ``path`` (full sha256, no shortcuts) and compare with ``expected``."""
    path = Path(path)
    name = asset.name if asset else None
    expected = expected.lower()
    expected_size = asset.size if asset else None
    foreign = _foreign_cache_entry(path, asset)
    if foreign is not None:
        # `download` would move it aside rather than use it, so it does not verify either.
        return VerifyResult(
            str(path), MISSING, expected, asset=name, expected_size=expected_size,
            message=f"cannot use: it is {foreign}, and the cache uses only regular files it wrote itself; "
                    f"remove it (what it points to is not the cache's), then run `vehiclenet download {name}`",
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        reason = exc.strerror or str(exc)
        return VerifyResult(
            str(path), MISSING, expected, asset=name, expected_size=expected_size,
            message=f"cannot read: {reason}; {_remedy(asset, path)}",
        )
    what = not_a_file_problem(path)
    if what is not None:
        # `download --force` cannot replace a folder, so the usual remedy would fail too.
        if asset is not None and _in_cache(path):
            todo = f"remove or rename it, then run `vehiclenet download {asset.name}`"
        else:
            todo = "give the path of the file itself"
        return VerifyResult(
            str(path), MISSING, expected, asset=name, expected_size=expected_size,
            message=f"cannot read: it is {what}; {todo}",
        )
    if expected_size is not None and size != expected_size:
        return VerifyResult(
            str(path), FAILED, expected, asset=name, size=size, expected_size=expected_size,
            message=f"size is {size} bytes, expected {expected_size}; {_remedy(asset, path)}",
        )
    t0 = time.perf_counter()
    try:
        got = sha256_file(path)
    except OSError as exc:
        return VerifyResult(
            str(path), MISSING, expected, asset=name, size=size, expected_size=expected_size,
            message=f"cannot read: {exc.strerror or exc}; {_remedy(asset, path)}",
        )
    seconds = time.perf_counter() - t0
    if got == expected:
        return VerifyResult(str(path), OK, expected, got, name, size, expected_size, seconds)
    return VerifyResult(
        str(path), FAILED, expected, got, name, size, expected_size, seconds,
        message=f"sha256 mismatch; {_remedy(asset, path)}",
    )


def _foreign_cache_entry(path: Path, asset: Optional[Asset]) -> Optional[str]:
    """What sits at ``asset``'s cache name if it is a link, FIFO or device there, else None."""
    if asset is None or path.absolute() != cached_path(asset).absolute():
        return None
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return None if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) else describe_entry(path, st)


def _in_cache(path: Path) -> bool:
    return path.resolve().parent == cache_dir().resolve()


def _remedy(asset: Optional[Asset], path: Path) -> str:
    if asset is None:
        return "obtain the file again from its source and check that --sha256 is right"
    if _in_cache(path):
        return f"run `vehiclenet download {asset.name} --force` to fetch a verified copy"
    return (
        f"delete it and run `vehiclenet download {asset.name}` (the verified copy goes to "
        f"{cached_path(asset)}), or copy a good file there"
    )


def verify_files(
    files: Sequence[Union[str, os.PathLike]],
    sha256: Optional[str] = None,
    manifest: Union[str, os.PathLike, None] = None,
) -> List[VerifyResult]:
    """Verify each file against ``sha256`` or, by file name, against the manifest.

    Raises :class:`UsageError` for a bad ``sha256`` or a file the manifest does not know
    (when no ``sha256`` is given).
    """
    if sha256 is not None:
        if not SHA256_HEX.match(sha256):
            raise UsageError(f"--sha256 {sha256!r} is not 64 hexadecimal characters")
        return [check_file(f, sha256) for f in files]
    assets = load_manifest(manifest)
    plan = []
    for f in files:
        asset = find_asset_for_file(f, assets)
        if asset is None:
            known = ", ".join(a.file for a in assets)
            raise UsageError(
                f"{f}: no asset in manifest {manifest_path(manifest)} has this file name (known: {known}); "
                f"give the expected hash with --sha256 HEX"
            )
        plan.append((f, asset))
    return [check_file(f, asset.sha256, asset) for f, asset in plan]


def verify_cache(manifest: Union[str, os.PathLike, None] = None) -> List[VerifyResult]:
    """Verify every asset of the manifest that is present in the cache."""
    results = []
    for asset in load_manifest(manifest):
        path = cached_path(asset)
        if os.path.lexists(path):  # a dangling link in the cache is reported too
            results.append(check_file(path, asset.sha256, asset))
    return results
