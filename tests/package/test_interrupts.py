"""Ctrl-C and SIGTERM at every moment of `embed` and `finetune`, through the real CLI (issue 14, item 4).

Each case starts ``python -m vehiclenet -v`` in a session of its own and signals its whole
process group, as a terminal does. It waits for the phase's marker in the debug log
(``now <activity>``, written as the command enters it) instead of sleeping, then asserts:
exit 130 (143 for SIGTERM), exactly one line that is not a log record, naming the phase and
what was kept; no traceback or MindSpore error; no temporary files in the output folder and
nothing new in the working folder (MindSpore's ``rank_0/`` analysis dumps included).
"""
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Set

import numpy as np
import pytest
from PIL import Image

from support.http_server import subprocess_env
from support.training import make_dataset

MARKER_TIMEOUT = 180  # seconds to reach a phase (MindSpore's start and a graph compilation included)
EXIT_TIMEOUT = 120  # seconds from the signal to the exit (a held compilation ends first)
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING) [\w.]+: ")
TEMP_NAME = re.compile(r"\.(tmp|partial)$|^\.tmp-")


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job


class Cli:
    """``python -m vehiclenet -v ARGS`` in a new session, its output read as it comes."""

    def __init__(self, *args, cwd: Path, env: Dict[str, str], ignore_sigint: bool = False) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "vehiclenet", "-v", *map(str, args)], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True,  # its own process group, like a terminal job
                                     preexec_fn=_ignore_sigint if ignore_sigint else None)
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        self._lines: "queue.Queue[str]" = queue.Queue()
        self._readers = [threading.Thread(target=self._read, args=(stream, into), daemon=True)
                         for stream, into in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, into: List[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            self._lines.put(line)

    def wait_for(self, pattern: str, timeout: float = MARKER_TIMEOUT) -> None:
        """Block until a line of stdout or stderr matches ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matched {pattern!r}; stderr:\n" + "\n".join(self.stderr[-30:]))
            if re.search(pattern, line):
                return

    def signal(self, signum: int) -> None:
        os.killpg(self.proc.pid, signum)  # the whole group, as Ctrl-C at a terminal

    def finish(self, timeout: float = EXIT_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise
        for reader in self._readers:
            reader.join(10)
        return code


def entries(folder: Path) -> Set[str]:
    """Every entry below ``folder`` (links not followed), as relative paths."""
    found = set()
    for root, dirs, files in os.walk(folder):
        found.update(os.path.relpath(os.path.join(root, n), folder) for n in dirs + files)
    return found


def assert_interrupted(run: Cli, code: int, command: str, how: str, activity: str, kept: str) -> str:
    """Exit ``code``; besides log records exactly one line, naming ``activity`` and ``kept``."""
    assert code == {"interrupted": 130, "terminated (SIGTERM)": 143}[how], "\n".join(run.stderr[-40:])
    others = [line for line in run.stderr if line.strip() and not LOG_LINE.match(line)]
    assert len(others) == 1, "\n".join(others[:40])
    line = others[0]
    assert line == run.stderr[-1] and line.startswith(f"vehiclenet {command}: {how} while {activity}"), line
    assert kept in line, line
    text = "\n".join(run.stderr)
    assert "Traceback" not in text and "[ERROR]" not in text and "CRITICAL" not in text
    return line


def assert_no_leftovers(cwd: Path, before: Set[str], out_dir: Path) -> None:
    """Nothing new in the working folder (MindSpore's rank_0/ dumps) and no temporary name in ``out_dir``."""
    assert entries(cwd) == before
    assert not [name for name in entries(out_dir) if TEMP_NAME.search(os.path.basename(name))]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The children's working folder, where MindSpore would drop rank_0/ and kernel_meta/."""
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def cli_env(tmp_path: Path) -> Dict[str, str]:
    return subprocess_env(GLOG_v="3", VEHICLENET_HOME=str(tmp_path / "home"))


# --------------------------------------------------------------------------- embed


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """40 small JPEGs: at --batch-size 2 twenty network calls, time enough to be interrupted among them."""
    folder = tmp_path_factory.mktemp("images") / "cars"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.jpg")
    return folder


EMBED_MOMENTS = {
    "import": ("loading MindSpore", r"now loading MindSpore"),
    "compile": ("compiling the network and embedding the first batch", r"now compiling the network"),
    "embedding": (r"embedding images (4 of 40 done)", r"now embedding images \(4 of 40 done\)"),
}


@pytest.mark.parametrize("moment", list(EMBED_MOMENTS))
def test_embed_interrupted_at_any_moment_exits_130_with_one_line(tmp_path, workdir, images, moment):
    activity, marker = EMBED_MOMENTS[moment]
    out = tmp_path / "out" / "feats.npz"
    out.parent.mkdir()
    before = entries(workdir)
    run = Cli("embed", images, "--out", out, "--no-pretrained", "--batch-size", 2, cwd=workdir,
              env=cli_env(tmp_path))
    run.wait_for(marker)
    run.signal(signal.SIGINT)
    assert_interrupted(run, run.finish(), "embed", "interrupted", activity, f"nothing written ({out} untouched)")
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert_no_leftovers(workdir, before, out.parent)


@pytest.mark.parametrize("delay", [0.25, 0.5, 0.75])
def test_embed_interrupted_deeper_into_the_import_never_aborts(tmp_path, workdir, images, delay):
    # Python's own KeyboardInterrupt at these depths of `import mindspore` aborted the
    # interpreter ("Fatal Python error: PyThreadState_Get", exit -6). There is no marker
    # inside MindSpore's import, hence a delay after its start.
    out = tmp_path / "feats.npz"
    run = Cli("embed", images, "--out", out, "--no-pretrained", "--batch-size", 2, cwd=workdir,
              env=cli_env(tmp_path))
    run.wait_for(r"now loading MindSpore")
    time.sleep(delay)
    run.signal(signal.SIGINT)
    assert_interrupted(run, run.finish(), "embed", "interrupted", "", "nothing written")
    assert "Fatal Python error" not in "\n".join(run.stderr) and not out.exists()


def test_embed_terminated_by_sigterm_exits_143_with_one_line(tmp_path, workdir, images):
    # After the first batch MindSpore's own SIGINT handler is in place; a real SIGTERM must
    # still be told apart from the SIGTERM that handler makes of a Ctrl-C.
    out = tmp_path / "out" / "feats.npz"
    out.parent.mkdir()
    before = entries(workdir)
    run = Cli("embed", images, "--out", out, "--no-pretrained", "--batch-size", 2, cwd=workdir,
              env=cli_env(tmp_path))
    run.wait_for(r"now embedding images \(4 of 40 done\)")
    run.signal(signal.SIGTERM)
    assert_interrupted(run, run.finish(), "embed", "terminated (SIGTERM)", "embedding images (4 of 40 done)",
                       "nothing written")
    assert list(out.parent.iterdir()) == []
    assert_no_leftovers(workdir, before, out.parent)


@pytest.mark.slow
def test_embed_started_with_sigint_ignored_keeps_ignoring_it(tmp_path, workdir, images):
    # A shell starts background jobs with SIGINT ignored; MindSpore's handler, registered at
    # every graph run, turned a Ctrl-C meant for the foreground job into a SIGTERM for this one.
    out = tmp_path / "feats.npz"
    run = Cli("embed", images, "--out", out, "--no-pretrained", "--batch-size", 2, cwd=workdir,
              env=cli_env(tmp_path), ignore_sigint=True)
    run.wait_for(r"now embedding images \(4 of 40 done\)")
    run.signal(signal.SIGINT)
    assert run.finish() == 0, "\n".join(run.stderr[-30:])
    assert any(line.startswith("embedded 40 image(s)") for line in run.stdout)
    with np.load(out) as npz:
        assert npz["features"].shape == (40, 512)


def test_stale_temporary_output_of_a_dead_process_is_removed_live_ones_kept(tmp_path):
    from vehiclenet.embedding.result import save_features
    from vehiclenet.fileio import _owner

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process that existed and is gone: what kill -9 leaves behind
    host = _owner().split("@", 1)[1]
    names = {
        "dead": f".f.npz.{dead.pid}@{host}.{'a' * 12}.tmp",
        "alive": f".f.npz.{os.getpid()}@{host}.{'b' * 12}.tmp",  # a run still writing: untouched
        "other host": f".f.npz.{dead.pid}@elsewhere-{host}.{'c' * 12}.tmp",  # its pids are not ours to judge
        "other output": f".g.npz.{dead.pid}@{host}.{'d' * 12}.tmp",  # not this output's: left to its owner
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half an npz")
    save_features(tmp_path / "f.npz", np.ones((1, 4), np.float32), ["a.jpg"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["f.npz", *(name for kind, name in names.items() if kind != "dead")])


# --------------------------------------------------------------------------- export


def test_export_interrupted_while_exporting_leaves_no_model_and_no_temporary_folder(tmp_path, workdir):
    out = tmp_path / "out" / "model.mindir"
    out.parent.mkdir()
    before = entries(workdir)
    run = Cli("export", "--format", "MINDIR", "--out", out, "--no-pretrained", "--image-size", 32, cwd=workdir,
              env=cli_env(tmp_path))
    run.wait_for(r"now exporting ")
    run.signal(signal.SIGINT)
    assert_interrupted(run, run.finish(), "export", "interrupted", f"exporting {out}",
                       f"nothing written ({out} untouched)")
    assert list(out.parent.iterdir()) == []  # the private folder MindSpore wrote into is gone too
    assert_no_leftovers(workdir, before, out.parent)


# --------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def cars(tmp_path_factory) -> Path:
    """2 identities x 12 images: at --batch-size 2, 12 steps an epoch."""
    return make_dataset(tmp_path_factory.mktemp("finetune") / "cars", n_ids=2, per_id=12, size=32)


def finetune(data: Path, out: Path, *extra, cwd: Path, env: Dict[str, str]) -> Cli:
    return Cli("finetune", "--data", data, "--out", out, "--epochs", 3, "--batch-size", 2, "--image-size", 32,
               "--no-pretrained", "--lr", 0.003, "--num-workers", 1, "--seed", 0, "--keep-max", 2, *extra,
               cwd=cwd, env=env)


def checkpoint_epoch(path: Path) -> int:
    from vehiclenet.model.checkpoint import read_checkpoint

    return int(read_checkpoint(path, keep_training_state=True)["epoch_num"].asnumpy())


@pytest.mark.parametrize("activity, marker", [
    ("loading MindSpore", r"now loading MindSpore"),
    ("compiling the training graph (first step of epoch 1)", r"now compiling the training graph"),
], ids=["import", "compile"])
@pytest.mark.slow
def test_finetune_interrupted_before_the_first_checkpoint_keeps_none(tmp_path, workdir, cars, activity, marker):
    out = tmp_path / "run"
    before = entries(workdir)
    run = finetune(cars, out, cwd=workdir, env=cli_env(tmp_path))
    run.wait_for(marker)
    run.signal(signal.SIGINT)
    assert_interrupted(run, run.finish(), "finetune", "interrupted", activity, "no checkpoint yet")
    assert not list(out.glob("*.ckpt"))
    assert_no_leftovers(workdir, before, out)


@pytest.mark.slow
def test_finetune_killed_and_interrupted_while_training_and_saving_resumes_from_last_complete_epoch(
        tmp_path, workdir, cars):
    out, env = tmp_path / "run", cli_env(tmp_path)
    before = entries(workdir)

    # kill -9 in the middle of writing epoch 1: its private temporary folder stays behind ...
    run = finetune(cars, out, cwd=workdir, env=env)
    run.wait_for(r"writing vehiclenet-e001\.ckpt in ")
    run.signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    stale = [p.name for p in out.iterdir() if p.name.endswith(".partial")]
    assert len(stale) == 1 and not list(out.glob("*.ckpt"))

    # ... until the next run in that folder, which removes it. Ctrl-C in the middle of its
    # epoch 2: epoch 1 is kept.
    run = finetune(cars, out, cwd=workdir, env=env)
    run.wait_for(r"now training epoch 2 of 3")
    run.signal(signal.SIGINT)
    first = out / "vehiclenet-e001.ckpt"
    assert_interrupted(run, run.finish(), "finetune", "interrupted", "training epoch 2 of 3",
                       f"kept {first} (epoch 1 complete): continue with --resume {first}")
    assert any(f"removed {out / stale[0]}, left by an interrupted run" in line for line in run.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "vehiclenet-e001.ckpt"]
    assert checkpoint_epoch(first) == 1

    # Resumed, and Ctrl-C while it saves epoch 2: the save completes first, and is kept.
    run = finetune(cars, out, "--resume", first, cwd=workdir, env=env)
    run.wait_for(r"now saving the checkpoint of epoch 2")
    run.signal(signal.SIGINT)
    second = out / "vehiclenet-e002.ckpt"
    assert_interrupted(run, run.finish(), "finetune", "interrupted", "saving the checkpoint of epoch 2",
                       f"kept {second} (epoch 2 complete): continue with --resume {second}")
    assert [line.split(":")[0] for line in run.stdout if line.startswith("epoch ")] == []  # shown after saving
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "vehiclenet-e001.ckpt", "vehiclenet-e002.ckpt"]
    assert checkpoint_epoch(second) == 2

    # --resume continues after the last complete epoch, to the end.
    run = finetune(cars, out, "--resume", second, cwd=workdir, env=env)
    assert run.finish() == 0, "\n".join(run.stderr[-30:])
    assert [line.split(":")[0] for line in run.stdout if line.startswith("epoch ")] == ["epoch 3/3"]
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "vehiclenet-e002.ckpt", "vehiclenet-e003.ckpt"]
    assert checkpoint_epoch(out / "vehiclenet-e003.ckpt") == 3
    assert_no_leftovers(workdir, before, out)


def test_progress_is_recorded_only_under_the_command_line_s_handling():
    """The library used from Python records nothing; handling() installs a Progress for its
    command and removes it after, so the next command starts from "starting"."""
    from vehiclenet import interrupts

    interrupts.doing("embedding images")
    interrupts.kept("kept out.npz")
    assert interrupts.activity() == "running"
    with interrupts.handling():
        assert interrupts.activity() == "starting"
        interrupts.doing("embedding images (3 of 9 done)")
        interrupts.kept("kept out.npz")
        with interrupts.held("saving"):
            assert interrupts.activity() == "saving"
        line = interrupts.report("embed", KeyboardInterrupt())
    assert line == "vehiclenet embed: interrupted while embedding images (3 of 9 done); kept out.npz"
    assert interrupts.activity() == "running"
    with interrupts.handling():
        assert interrupts.report(None, KeyboardInterrupt()).endswith("while starting; nothing was written")
