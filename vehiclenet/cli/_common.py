"""The options every command shares, declared once: ``-q/--quiet``, ``-v/--verbose`` and, on
every command that prints results, ``--json`` (the README table "Common options")."""
import argparse
import json
import sys
from typing import Any, Dict, Iterable, List, Optional

_COMMON = argparse.ArgumentParser(add_help=False)
# SUPPRESS: a value given before the command (`vehiclenet -v embed ...`) is not reset by the
# command's own default.
_COMMON.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                     help="warnings and errors only: no progress bars, no INFO messages")
_COMMON.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                     help="also log debug messages")


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``-q`` and ``-v`` on the top-level parser, for `vehiclenet -v COMMAND ...`."""
    parser.add_argument("-q", "--quiet", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def add_command(sub: "argparse._SubParsersAction", name: str, *, json_help: Optional[str] = None,
                **kwargs: Any) -> argparse.ArgumentParser:
    """A sub-command with the common options (and ``--json``, described by ``json_help``)."""
    parser = sub.add_parser(name, parents=[_COMMON], **kwargs)
    if json_help:
        parser.add_argument("--json", action="store_true", help=json_help)
    return parser


def progress(args: argparse.Namespace) -> Optional[bool]:
    """Progress bars: off with -q (and --json), else the library's choice (on a terminal)."""
    return False if args.quiet or getattr(args, "json", False) else None


def shown(name: str) -> str:
    """A file name as text output prints it: as it is when every character is printable, else
    quoted with escapes (repr), so no escape sequence reaches the terminal and no newline
    forges a line. --json output needs none of this: JSON escapes them itself."""
    return name if name.isprintable() else repr(name)


def emit(args: argparse.Namespace, lines: Iterable[str], result: Dict[str, Any]) -> None:
    """The command's result on stdout: ``lines`` for people, or ``result`` as one JSON
    object on one line with --json.

    Raises:
        UsageError: standard output is closed (``>&-``): the results would be lost without a word.
    """
    if sys.stdout is None:
        from ..errors import UsageError

        raise UsageError("standard output is closed, so the results have nowhere to go: run the command with "
                         "an open standard output (a terminal, a pipe, or a file: > results.txt)")
    if getattr(args, "json", False):
        print(json.dumps(result, default=str), flush=True)
        return
    for line in lines:
        print(line, flush=True)


def add_threshold_arg(parser: argparse.ArgumentParser) -> None:
    """``--threshold FILE``: mark the matches a calibrated threshold calls the same vehicle."""
    parser.add_argument("--threshold", metavar="THRESHOLD.json",
                        help="mark matches below the distance of this `vehiclenet calibrate` file as the same vehicle")


def load_threshold(args: argparse.Namespace) -> Optional[float]:
    """The threshold distance of ``--threshold`` (None without one), read before any work."""
    if not getattr(args, "threshold", None):
        return None
    from ..retrieval.calibration import load_calibration

    return load_calibration(args.threshold).distance


def same_vehicle_mark(distance: float, threshold: Optional[float]) -> str:
    """Text output's mark of a match below the threshold ("" without a threshold or above it)."""
    return "  same vehicle" if threshold is not None and distance < threshold else ""


def same_vehicle_field(distance: float, threshold: Optional[float]) -> Dict[str, bool]:
    """JSON output's ``same_vehicle`` of a match (absent without a threshold)."""
    return {} if threshold is None else {"same_vehicle": bool(distance < threshold)}


def add_filter_args(parser: argparse.ArgumentParser) -> None:
    """The filters of filtered search (``search``, ``rank``): applied inside the search."""
    group = parser.add_argument_group(
        "filters", "keep only some gallery images, inside the search (a filtered top-k is the top-k of the images "
        "that pass); they read the cameras, times and tags the gallery was built with (--meta)")
    group.add_argument("--cameras", metavar="C,C,...", help="only these cameras (comma-separated numbers)")
    group.add_argument("--exclude-same-camera", action="store_true",
                       help="leave out the query's own camera (--query-camera, the query features' cams, or a "
                       "VeRi-776 query file name)")
    group.add_argument("--query-camera", type=int, metavar="C", help="the camera of the query images")
    group.add_argument("--after", metavar="TIME",
                       help="only images taken at or after TIME (seconds since 1970, or 2018-03-11 11:40:38, UTC "
                       "unless it ends in an offset)")
    group.add_argument("--before", metavar="TIME", help="only images taken before TIME")
    group.add_argument("--tag", action="append", default=[], metavar="TAG",
                       help="only images carrying TAG (repeat: all of them)")


def row_filter(args: argparse.Namespace) -> Any:
    """The :class:`vehiclenet.retrieval.filters.RowFilter` of the filter options, checked before any work."""
    from ..errors import UsageError
    from ..retrieval.filters import RowFilter
    from ..embedding.metadata import parse_time

    cameras = None
    if args.cameras is not None:
        try:
            cameras = tuple(sorted({int(c) for c in args.cameras.split(",") if c.strip()}))
        except ValueError:
            raise UsageError(f"--cameras {args.cameras!r}: give camera numbers separated by commas, e.g. 1,4,7") \
                from None
    if (cameras and cameras[0] < 0) or (args.query_camera is not None and args.query_camera < 0):
        raise UsageError("cameras are numbers from 0 (--cameras, --query-camera)")
    if args.query_camera is not None and not args.exclude_same_camera:
        raise UsageError("--query-camera only serves --exclude-same-camera: add it, or drop --query-camera")
    tags = tuple(t.strip() for t in args.tag)
    if any(not t or "," in t for t in tags):
        raise UsageError("--tag takes one non-empty tag without commas; repeat --tag for several")
    return RowFilter(cameras=cameras, after=None if args.after is None else parse_time(args.after, "--after"),
                     before=None if args.before is None else parse_time(args.before, "--before"), tags=tags,
                     exclude_same_camera=args.exclude_same_camera)


def query_cameras(args: argparse.Namespace, paths: List[str], stored: Optional[Any] = None) -> Optional[List[int]]:
    """Each query's camera for --exclude-same-camera: --query-camera, else ``stored`` (the
    query features' cams), else VeRi-776 file names; None when none of them says."""
    if args.query_camera is not None:
        return [args.query_camera] * len(paths)
    if stored is not None:
        return [int(c) for c in stored]
    from ..datasets.veri import parse_veri_name
    from ..errors import DataError

    try:
        return [parse_veri_name(p)[1] for p in paths]
    except DataError:
        return None
