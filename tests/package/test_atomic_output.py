"""fileio.atomic_output: the one writer every output goes through (npz, pictures, labels,
checkpoints, exports, compiled kernels, and the rename of a finished download)."""
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vehiclenet import fileio, native

PACKAGE = Path(__file__).resolve().parents[2] / "vehiclenet"
OLD, NEW = b"previous content", b"new content"


def test_no_module_renames_or_syncs_outputs_on_its_own():
    """os.replace / os.rename / tempfile / fsync live in fileio.py only; the one other rename
    is download's move of a foreign cache entry aside (<name>.corrupt), which writes nothing."""
    allowed = {("download.py", "os.replace(path, aside)")}
    found = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "fileio.py":
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            code = line.split("#", 1)[0]
            if re.search(r"\bos\.(replace|rename|fsync)\(|\btempfile\.|\.rename\(", code):
                found.add((path.name, code.strip()))
    assert found == allowed


def _leftovers(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_output_appears_whole_and_only_on_success(tmp_path):
    out = tmp_path / "out.bin"
    out.write_bytes(OLD)
    with fileio.atomic_output(out) as tmp:
        assert re.fullmatch(rf"\.out\.bin\.{os.getpid()}@[A-Za-z0-9-]*\.[0-9a-f]{{12}}\.partial", tmp.parent.name)
        assert tmp.name == "out.bin" and tmp.parent.parent == tmp_path
        tmp.write_bytes(NEW)
        assert out.read_bytes() == OLD  # readers see the previous file until the block ends
    assert out.read_bytes() == NEW and _leftovers(tmp_path) == []

    with pytest.raises(ZeroDivisionError):
        with fileio.atomic_output(out, "model.mindir") as tmp:
            assert tmp.name == "model.mindir"
            tmp.write_bytes(b"half")
            1 / 0
    assert out.read_bytes() == NEW and _leftovers(tmp_path) == []

    with pytest.raises(FileNotFoundError):  # the writer said it was done but wrote nothing
        with fileio.atomic_output(out):
            pass
    assert out.read_bytes() == NEW and _leftovers(tmp_path) == []


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path):
    old = os.umask(0o022)
    try:
        with fileio.atomic_write(tmp_path / "f.json", "w") as handle:
            handle.write("{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f.json").st_mode) == 0o644
    assert (tmp_path / "f.json").read_text() == "{}"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_every_output_gets_the_mode_of_a_plain_open_whatever_its_writer_chose(tmp_path, umask):
    """MindSpore writes checkpoints and MindIR 0400; a compiler writes 0777 minus the umask."""
    old = os.umask(umask)
    try:
        assert fileio.current_umask() == umask
        for name, written, private, expected in (
                ("weights.ckpt", 0o400, False, 0o666 & ~umask),
                ("tool", 0o700, False, 0o777 & ~umask),
                ("lib.so", 0o775, True, 0o777 & ~umask & ~0o022),
                ("lib.so.sha256", 0o664, True, 0o666 & ~umask & ~0o022)):
            with fileio.atomic_output(tmp_path / name, private=private) as tmp:
                tmp.write_bytes(b"x")
                os.chmod(tmp, written)
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    finally:
        os.umask(old)


def test_publish_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(f"fsync {kind}")
        real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    with fileio.atomic_write(tmp_path / "f.bin") as handle:
        handle.write(NEW)
    assert events == ["fsync file", "rename", "fsync folder"]


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_a_killed_build_leaves_nothing_the_next_build_keeps(tmp_path):
    """Native builds write through atomic_output: a failed compile leaves nothing, and the
    private folder of a killed build (dead process) goes with the next build of that library."""
    source = tmp_path / "tiny.c"
    source.write_text("int vn_tiny(void) { return 7; }\n")
    build_dir = tmp_path / "kernels"
    args = ["-O0", "-shared", "-fPIC"]
    options = dict(compiler_env="CC", default_compiler="cc", build_dir=build_dir)
    target = native.library_file(source, "tiny", args, **options)[1]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = fileio._owner().split("@", 1)[1]
    build_dir.mkdir()
    stale = build_dir / f".{target.name}.{dead.pid}@{host}.{'a' * 12}.partial"
    stale.mkdir()
    (stale / target.name).write_bytes(b"half a library")

    with pytest.raises(native.NativeBuildError, match="compiling .*tiny.c failed"):
        native.build(source, "tiny", [*args, "-include", str(tmp_path / "missing.h")], **options)
    assert sorted(p.name for p in build_dir.iterdir() if not p.name.endswith(".lock")) == [stale.name]

    assert native.build(source, "tiny", args, **options) == target
    import ctypes

    assert ctypes.CDLL(str(target)).vn_tiny() == 7
    # The library, and the sha256 its build recorded (checked before every load).
    assert sorted(p.name for p in build_dir.iterdir() if not p.name.endswith(".lock")) == [
        target.name, target.name + ".sha256"]
