"""The options every command shares, declared once: ``-q/--quiet``, ``-v/--verbose`` and, on
every command that prints results, ``--json`` (the README table "Common options")."""
import argparse
import json
import sys
from typing import Any, Dict, Iterable, Optional

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
    from ..calibration import load_calibration

    return load_calibration(args.threshold).distance


def same_vehicle_mark(distance: float, threshold: Optional[float]) -> str:
    """Text output's mark of a match below the threshold ("" without a threshold or above it)."""
    return "  same vehicle" if threshold is not None and distance < threshold else ""


def same_vehicle_field(distance: float, threshold: Optional[float]) -> Dict[str, bool]:
    """JSON output's ``same_vehicle`` of a match (absent without a threshold)."""
    return {} if threshold is None else {"same_vehicle": bool(distance < threshold)}
