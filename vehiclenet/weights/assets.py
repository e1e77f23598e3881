"""The asset manifest (``assets.json``): which checkpoint files exist, where, and their sha256.

The manifest is validated when it is loaded, so a bad entry fails at once with a message
that names the manifest file, the asset and the key, rather than later as a failed
download or a wrong model. Tools outside the package write manifests too
(``VEHICLENET_ASSETS``), so the minimum shape is small::

    {"assets": [{"name": ..., "file": ..., "sha256": ..., "urls": [...]}]}

The first asset is the default. Optional keys: ``size`` (bytes; null/absent = unknown),
``format``, ``num_classes``, ``last_stride``, ``input_size``, ``metrics``, ``license``,
``source``; any other key is kept in :attr:`Asset.extra`. ``num_classes`` (the head's
identities), ``last_stride`` (layer4's stride, 1 or 2) and ``input_size`` ([height, width])
describe the network the weights fit: ``create_network`` builds that network and the
feature pipeline resizes to that size unless the caller says otherwise.

This module must stay cheap to import: the ``verify`` command uses it.
"""
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import urlsplit

from .. import env
from ..errors import ManifestError
from ..fileio import NotRegularFileError, open_regular

ENV_ASSETS = env.ASSETS  # its name, for messages
PACKAGED_MANIFEST = Path(__file__).resolve().parent.parent / "assets.json"

SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")  # a sha256 as 64 hex digits (manifest, verify --sha256)
_SUPPORTED_SCHEMAS = (1,)


@dataclass(frozen=True)
class Asset:
    """One downloadable file of the manifest (a checkpoint, usually)."""

    name: str
    file: str
    sha256: str
    urls: Tuple[str, ...]
    size: Optional[int] = None
    format: Optional[str] = None
    num_classes: Optional[int] = None
    last_stride: Optional[int] = None
    input_size: Optional[Tuple[int, int]] = None  # (height, width)
    # Mappings are unhashable; they are left out of hashing/equality so Asset stays usable
    # as a dict key.
    metrics: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    license: Optional[str] = None
    source: Optional[str] = None
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    manifest: Optional[Path] = field(default=None, compare=False, hash=False)

    def get(self, key: str, default: Any = None) -> Any:
        """Value of a manifest key (known field or extra key such as ``architecture``)."""
        if key in _KNOWN_KEYS:
            value = getattr(self, key)
            return default if value is None else value
        return self.extra.get(key, default)


# scheme://<userinfo>@ : the greedy run stops at the host's end, so the last '@' before
# the path is the one that ends the user-info (a password may hold '@' itself).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/?#]*@")


def redact_url(text: str) -> str:
    """``text`` (a URL, or a message holding URLs) with each URL's ``user:password@`` shown as ``***@``.

    Every URL shown to people (logs, errors, ``info``, JSON) goes through this, so a
    mirror or manifest URL carrying credentials never prints them.
    """
    return _USERINFO.sub(r"\1***@", text)


def url_problem(url: str) -> Optional[str]:
    """Why ``url`` may not be used for a download, or None if it may.

    Only https is accepted; plain http only to a loopback address (local test servers,
    a mirror on the same machine), because http bytes can be altered in transit and
    would then fail verification after a full 300 MB transfer.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as exc:
        return f"not a valid URL ({exc})"
    if parts.scheme == "https":
        return None if host else "has no host name"
    if parts.scheme == "http":
        if host and _is_loopback(host):
            return None
        return "uses plain http; only https is allowed (http only to 127.0.0.1, ::1 or localhost)"
    return f"has scheme {parts.scheme or '(none)'!r}; only https is allowed"


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# The cache folder's own sub-folder for lock files (download.py keeps its locks there).
LOCK_DIR = ".locks"


def file_name_problem(name: Any) -> Optional[str]:
    """Why ``name`` is not a bare file name the cache can hold, or None if it is one."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty string"
    if "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        return "must be a bare file name, not a path (no '/' or '\\')"
    if name in (".", ".."):
        return "must be a bare file name"
    # A newline would split the lines of logs, `verify` output and `sha256sum -c` lists.
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "must not contain control characters (newline, tab, NUL...)"
    if name in (LOCK_DIR, env.KERNEL_FOLDER, env.COMPILED_FOLDER):
        return f"is the name of one of the cache's own folders ({LOCK_DIR}, {env.KERNEL_FOLDER}, {env.COMPILED_FOLDER})"
    if name.endswith((".part", ".lock", ".corrupt")):
        return "must not end in .part, .lock or .corrupt (the cache uses those suffixes)"
    return None


def manifest_path(path: Union[str, os.PathLike, None] = None) -> Path:
    """The manifest in use: ``path``, else ``$VEHICLENET_ASSETS``, else the packaged one."""
    if path is not None:
        return Path(path)
    return env.manifest_override() or PACKAGED_MANIFEST


MANIFEST_MAX_BYTES = 1 << 20  # an assets.json lists a few assets: a few KiB


def _read_bounded(path: Path) -> bytes:
    """A manifest's bytes, refusing (ManifestError) one larger than :data:`MANIFEST_MAX_BYTES`."""
    with open(open_regular(path, os.O_RDONLY, follow=True), "rb") as fh:
        data = fh.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise ManifestError(f"manifest {path} is larger than {MANIFEST_MAX_BYTES >> 20} MiB: not an assets.json "
                            f"(a list of a few assets); point {ENV_ASSETS} at the right file")
    return data


def load_manifest(path: Union[str, os.PathLike, None] = None) -> List[Asset]:
    """Read and validate a manifest; see :func:`manifest_path` for which file.

    Raises :class:`ManifestError` (exit code 2) naming the file, asset and key.
    """
    where = manifest_path(path)
    source = f" (from ${ENV_ASSETS})" if path is None and env.is_set(ENV_ASSETS) else ""
    try:
        text = _read_bounded(where).decode("utf-8")
    except NotRegularFileError as exc:
        raise ManifestError(f"manifest {where}{source} is {exc.what}, not a file; point {ENV_ASSETS} at an "
                            "assets.json file or unset it to use the packaged manifest") from None
    except FileNotFoundError:
        raise ManifestError(
            f"manifest {where}{source} does not exist; point {ENV_ASSETS} at an existing assets.json "
            f"or unset it to use the packaged manifest"
        ) from None
    except UnicodeDecodeError as exc:
        # JSON is UTF-8 by definition; a UTF-16 or Latin-1 file is as unusable as bad syntax.
        raise ManifestError(
            f"manifest {where}{source} is not valid JSON: not UTF-8 text (byte {exc.object[exc.start]:#04x} "
            f"at offset {exc.start}); save it as UTF-8"
        ) from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {where}{source}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"manifest {where}{source} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}; "
            f"fix the syntax"
        ) from None
    except RecursionError:
        # json's decoder recurses once per level; a manifest is a list of flat objects.
        raise ManifestError(
            f"manifest {where}{source} is nested too deeply to be a manifest (arrays or objects inside each other "
            f"thousands of levels deep); a manifest is {{\"assets\": [{{\"name\": ..., ...}}]}}"
        ) from None
    return parse_manifest(data, where)


def parse_manifest(data: Any, where: Union[str, os.PathLike] = "<manifest>") -> List[Asset]:
    """Validate already-parsed manifest JSON; ``where`` is used in error messages."""
    where = Path(where)
    if not isinstance(data, dict):
        raise ManifestError(f"manifest {where}: the top level must be a JSON object with an \"assets\" list")
    schema = data.get("schema", 1)
    if schema not in _SUPPORTED_SCHEMAS:
        raise ManifestError(
            f"manifest {where}: schema {schema!r} is not supported by this vehiclenet "
            f"(supports {', '.join(map(str, _SUPPORTED_SCHEMAS))}); upgrade vehiclenet or fix \"schema\""
        )
    entries = data.get("assets")
    if not isinstance(entries, list) or not entries:
        raise ManifestError(
            f"manifest {where}: key \"assets\" must be a non-empty list of asset objects "
            f"(each with name, file, sha256, urls)"
        )
    assets: List[Asset] = []
    seen: Dict[str, int] = {}
    for index, entry in enumerate(entries):
        asset = _parse_asset(entry, index, where)
        if asset.name in seen:
            raise ManifestError(
                f"manifest {where}: asset #{index} reuses the name {asset.name!r} of asset #{seen[asset.name]}; "
                f"names must be unique"
            )
        seen[asset.name] = index
        assets.append(asset)
    return assets


def _parse_asset(entry: Any, index: int, where: Path) -> Asset:
    """One validated manifest entry; ManifestError names the manifest, the asset and the key."""
    label = f"asset #{index}"
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        label += f" ({entry['name']!r})"
    if not isinstance(entry, dict):
        raise ManifestError(f"manifest {where}: {label} must be a JSON object, got {type(entry).__name__}")
    for key in _REQUIRED_KEYS:
        if key not in entry:
            raise _bad_key(where, label, key, "is missing", "every asset needs name, file, sha256 and urls")
    for key, rule in _RULES.items():
        found = rule(entry.get(key))
        if found is not None:
            raise _bad_key(where, label, key, *found)
    return _asset_from_entry(entry, where)


def _bad_key(where: Path, label: str, key: str, problem: str, fix: str) -> ManifestError:
    """The error for one bad key of one asset: manifest, asset, key, what is wrong and what to do."""
    return ManifestError(f"manifest {where}: {label}, key {key!r}: {problem}; {fix}")


def _asset_from_entry(entry: Dict[str, Any], where: Path) -> Asset:
    """The Asset of an entry that has passed every rule of :data:`_RULES`."""
    return Asset(
        name=entry["name"],
        file=entry["file"],
        sha256=entry["sha256"].lower(),
        urls=tuple(entry["urls"]),
        size=entry.get("size"),
        format=entry.get("format"),
        num_classes=entry.get("num_classes"),
        last_stride=entry.get("last_stride"),
        input_size=_input_size(entry.get("input_size")),
        metrics=dict(entry.get("metrics") or {}),
        license=entry.get("license"),
        source=entry.get("source"),
        extra={k: v for k, v in entry.items() if k not in _KNOWN_KEYS},
        manifest=where,
    )


# A rule's answer: None when the value is fine, else (what is wrong, how to fix it).
_Problem = Optional[Tuple[str, str]]


def _name_rule(name: Any) -> _Problem:
    """``name``: a non-empty string without whitespace."""
    if not isinstance(name, str) or not name.strip() or any(c.isspace() for c in name):
        return f"{name!r} is not a usable name", "use a non-empty name without spaces"
    return None


def _file_rule(file: Any) -> _Problem:
    """``file``: a bare file name the cache can hold (see :func:`file_name_problem`)."""
    problem = file_name_problem(file)
    if problem:
        return f"{file!r} {problem}", "give only the file name; the cache folder is chosen by vehiclenet"
    return None


def _sha256_rule(sha: Any) -> _Problem:
    """``sha256``: 64 hexadecimal digits, either case."""
    if not isinstance(sha, str) or not SHA256_HEX.match(sha):
        return (f"{sha!r} is not 64 hexadecimal characters",
                "copy the full SHA-256 of the file (e.g. from `sha256sum FILE` or the model card)")
    return None


def _urls_rule(urls: Any) -> _Problem:
    """``urls``: a non-empty list of strings, each a URL :func:`url_problem` accepts."""
    if isinstance(urls, str) or not isinstance(urls, list) or not urls:
        return "must be a non-empty list of URL strings", "list at least one https URL"
    for i, url in enumerate(urls):
        if not isinstance(url, str):
            return f"entry {i} is not a string", "list URL strings"
        problem = url_problem(url)
        if problem:
            return f"entry {i} {redact_url(url)!r} {problem}", "use an https URL"
    return None


def _is_positive_int(value: Any) -> bool:
    """True for an int above 0; bool is an int to Python but never a count in a manifest."""
    return not isinstance(value, bool) and isinstance(value, int) and value > 0


def _size_rule(size: Any) -> _Problem:
    """``size`` (optional): bytes, a positive integer."""
    if size is not None and not _is_positive_int(size):
        return f"{size!r} is not a positive integer", "give the size in bytes, or null if unknown"
    return None


def _num_classes_rule(num_classes: Any) -> _Problem:
    """``num_classes`` (optional): the head's identities, a positive integer."""
    if num_classes is not None and not _is_positive_int(num_classes):
        return f"{num_classes!r} is not a positive integer", "give the classifier's class count"
    return None


def _last_stride_rule(last_stride: Any) -> _Problem:
    """``last_stride`` (optional): layer4's stride, 1 or 2."""
    if last_stride is not None and (isinstance(last_stride, bool) or last_stride not in (1, 2)):
        return f"{last_stride!r} is not 1 or 2", "give layer4's stride the weights were trained with"
    return None


def _input_size_rule(value: Any) -> _Problem:
    """``input_size`` (optional): [height, width], as :func:`_input_size` reads it."""
    try:
        _input_size(value)
    except ValueError:
        return (f"{value!r} is not [height, width] of at least 32 pixels each",
                "give the size the weights were evaluated at, e.g. [384, 384]")
    return None


def _metrics_rule(metrics: Any) -> _Problem:
    """``metrics`` (optional): an object; null, or any other empty value, means none."""
    if not isinstance(metrics or {}, dict):
        return "must be an object", 'e.g. {"mAP": 0.8371, "protocol": "..."}'
    return None


def _optional_string_rule(value: Any) -> _Problem:
    """``format``, ``license``, ``source`` (optional): a string."""
    if value is not None and not isinstance(value, str):
        return f"{value!r} is not a string", "give a string or leave the key out"
    return None


_REQUIRED_KEYS = ("name", "file", "sha256", "urls")
# Every known key's rule. Keys are checked in this order, so an entry with several bad keys
# always reports the same one.
_RULES: Dict[str, Callable[[Any], _Problem]] = {
    "name": _name_rule,
    "file": _file_rule,
    "sha256": _sha256_rule,
    "urls": _urls_rule,
    "size": _size_rule,
    "num_classes": _num_classes_rule,
    "last_stride": _last_stride_rule,
    "input_size": _input_size_rule,
    "metrics": _metrics_rule,
    "format": _optional_string_rule,
    "license": _optional_string_rule,
    "source": _optional_string_rule,
}
_KNOWN_KEYS = frozenset(_RULES)  # any other key of an entry goes to Asset.extra


def _input_size(value: Any) -> Optional[Tuple[int, int]]:
    """A manifest's ``input_size`` as (height, width), None when absent; ValueError unless
    it is a list of two whole numbers >= 32 (the network's five halvings need 32)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise ValueError(value)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 32 for v in value):
        raise ValueError(value)
    return value[0], value[1]


def get_asset(name: Optional[str] = None, manifest: Union[str, os.PathLike, None] = None) -> Asset:
    """The asset called ``name`` (default: the manifest's first asset).

    Raises :class:`ManifestError` listing the known names when ``name`` is unknown.
    """
    assets = load_manifest(manifest)
    if name is None:
        return assets[0]
    for asset in assets:
        if asset.name == name:
            return asset
    known = ", ".join(a.name for a in assets)
    raise ManifestError(
        f"no asset named {name!r} in manifest {manifest_path(manifest)}; known assets: {known}"
    )


def find_asset_for_file(path: Union[str, os.PathLike], assets: List[Asset]) -> Optional[Asset]:
    """The asset whose ``file`` is the base name of ``path``, if any."""
    base = Path(path).name
    for asset in assets:
        if asset.file == base:
            return asset
    return None
