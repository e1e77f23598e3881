"""Command line: a thin layer over the library.

Each sub-command imports what it needs inside its handler, so commands that need no
network graph (download, verify, info, evaluate --features, embed-merge, index build/add,
search --features, calibrate) never import mindspore. One module per group of commands:
``assets`` (download, verify, info), ``evaluate``, ``embed`` (embed, embed-merge, rank),
``index`` (index, search), ``calibrate`` (calibrate, compare), ``train`` (finetune, export);
``_network`` holds what the commands that run the network share.
Exit codes: 0 success, 1 failure (mismatch, missing file, download error), 2 usage or
manifest errors, 130 interrupted (Ctrl-C), 141 standard output closed by its reader (| head),
143 terminated (SIGTERM); see interrupts.py.
"""
import argparse
import logging
import os
import sys
import warnings
from typing import List, Optional

from .. import __version__
from ..errors import UsageError, VehicleNetError
from ._common import add_common_options
from .assets import add_asset_commands
from .calibrate import add_calibrate_commands
from .embed import add_embed_commands, add_rank_command
from .evaluate import add_evaluate_command
from .index import add_index_commands
from .train import add_export_command, add_finetune_command

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vehiclenet",
        description="VehicleNet vehicle re-identification: weights, embeddings, search, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"vehiclenet {__version__}")
    add_common_options(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    # Each concern registers its own sub-commands below.
    add_asset_commands(sub)
    add_evaluate_command(sub)
    add_embed_commands(sub)
    add_rank_command(sub)
    add_index_commands(sub)
    add_calibrate_commands(sub)
    add_finetune_command(sub)
    add_export_command(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from ..interrupts import exit_code, handling, report

    command = None
    # First, before any thread starts: the threads inherit the signal mask handling() sets.
    with handling():
        try:
            args = build_parser().parse_args(argv)
            command = args.command
            return _run(args)
        except KeyboardInterrupt as exc:
            # Ctrl-C (or SIGTERM): one line saying what was interrupted and what is kept.
            print(report(command, exc), file=sys.stderr)
            return exit_code(exc)


def _run(args: argparse.Namespace) -> int:
    from ..interrupts import activity

    # A terminal or locale that cannot show a file name's characters gets escapes, not a traceback.
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    # -v wins over -q: asking for debug messages and fewer messages at once keeps the debug ones.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # Images get vehiclenet's own, configurable pixel limit (VEHICLENET_MAX_PIXELS); Pillow's
    # warning above 89 million pixels would only repeat it, worded as an attack.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    try:
        _check_surroundings()
        code = int(args.func(args) or 0)
        if sys.stdout is not None:
            sys.stdout.flush()  # a reader that stopped early shows here, not as a warning at exit
        return code
    except BrokenPipeError:
        # The reader of our standard output stopped (`| head -1`): what it wanted it has; end
        # quietly with the status a shell gives a program SIGPIPE ends, and let nothing more
        # be written to the closed pipe at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + 13
    except VehicleNetError as exc:
        print(f"vehiclenet {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        # A file the command reads or writes failed at the system level (a folder where a
        # file should be, a read-only folder, a full disk): name it rather than dump a traceback.
        # A write that fails (a full disk) carries no file name: say what the command was doing.
        where = f"{exc.filename}: " if exc.filename else f"while {activity()}: "
        print(f"vehiclenet {args.command}: error: {where}{exc.strerror or exc} "
              "(check the path, its permissions and the free space)", file=sys.stderr)
        return 1


def _check_surroundings() -> None:
    """Before any work: the working folder exists (relative paths and MindSpore's own files need
    it; without it MindSpore aborts) and every VEHICLENET_* setting parses."""
    from .. import env

    try:
        os.getcwd()
    except FileNotFoundError:
        raise UsageError("the working folder no longer exists (it was deleted while this shell was in it): cd to "
                         "an existing folder and run the command again") from None
    env.check_all()
