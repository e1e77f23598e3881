"""Never run code from a cache someone else can write (issue 28).

The compiled kernel libraries and MindSpore's compiled graphs are code: a library planted at
the exact name the kernel cache would build runs its constructor as whoever loads it. Here
the planted libraries' constructors write a marker file; each test first shows that such a
library does run when loaded (so a missing marker means it was not loaded), then that the
package never loads it. Foreign ownership needs root (``chown`` to ``nobody``, as CI runs);
the plain-user checks run in a child process that drops to ``nobody``.
"""
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from support.http_server import subprocess_env
from vehiclenet import cache_trust, native
from vehiclenet.model import cpu_kernels

NOBODY = 65534
OTHER_USER = 1  # "daemon" on Debian: a second non-root owner
root_only = pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

PLANTED = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
  FILE *f = fopen(MARKER, "w");
  if (f) { fprintf(f, "planted library code ran (uid %d)\n", (int)getuid()); fclose(f); }
}
int VnTopK(void) { return 0; }
"""


def planted_library(folder: Path, marker: Path) -> Path:
    """A shared library whose constructor writes ``marker`` (as a hostile user would plant it)."""
    source = folder / "planted.c"
    source.write_text(PLANTED)
    out = folder / "planted.so"
    subprocess.run(["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', str(source), "-o", str(out)], check=True)
    return out


def runs_when_loaded(library: Path, marker: Path) -> bool:
    """Load ``library`` in a throw-away process: does its constructor write ``marker``?"""
    subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library)!r})"], check=True)
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran


def kernel_names(folder: Path) -> list:
    """The exact paths the kernel cache in ``folder`` would build the two libraries at."""
    args, options = cpu_kernels._build_inputs(folder)
    cpu = native.library_file(cpu_kernels.SOURCE, "cpu_kernels", args, **options)[1]
    retrieval = native.library_file(native.RETRIEVAL_SOURCE, "retrieval_kernels", native.RETRIEVAL_FLAGS,
                                    compiler_env="CC", default_compiler="cc", build_dir=folder)[1]
    return [cpu, retrieval]


def plant(folder: Path, library: Path) -> list:
    """The planted library at both kernel names, each with a matching sha256 line beside it
    (whoever can write the folder can write that too)."""
    folder.mkdir(parents=True, exist_ok=True)
    targets = kernel_names(folder)
    for target in targets:
        shutil.copy(library, target)
        cache_trust.write_digest(target, _sha256(target))
    return targets


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def chown_tree(path: Path, uid: int) -> None:
    for folder, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.chown(os.path.join(folder, name), uid, uid, follow_symlinks=False)
    os.chown(path, uid, uid)


def warnings_about(stderr: str, folder: Path) -> list:
    return [line for line in stderr.splitlines() if f"not loading compiled kernels from {folder}" in line]


def run_vehiclenet(*args, home: Path, user_cache: Path, **extra) -> subprocess.CompletedProcess:
    env = subprocess_env(VEHICLENET_HOME=str(home), XDG_CACHE_HOME=str(user_cache), GLOG_v="3", **extra)
    env.pop("VEHICLENET_KERNEL_CACHE", None)  # the kernels' folder is the one in VEHICLENET_HOME
    return subprocess.run([sys.executable, "-m", "vehiclenet", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def evaluation_features(tmp_path_factory) -> Path:
    """A small query/gallery features file: `evaluate --features` runs the retrieval kernels."""
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("features") / "f.npz"

    def rows(n):
        f = rng.standard_normal((n, 16)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True), rng.integers(0, 5, n), rng.integers(0, 3, n)

    (qf, qi, qc), (gf, gi, gc) = rows(12), rows(60)
    np.savez(path, query_features=qf, query_ids=qi, query_cams=qc, gallery_features=gf, gallery_ids=gi,
             gallery_cams=gc)
    return path


# --------------------------------------------------------------------------- planted libraries


HOSTILE = {  # how the cache root and its kernels/ are set up, and what the refusal names
    "foreign kernels/ in a 1777 root": (0o1777, NOBODY, 0o755, "is writable by others (mode 1777)"),
    "foreign kernels/ in our own root": (0o755, NOBODY, 0o755, "is owned by uid 65534 (nobody), not by you"),
    "world-writable kernels/": (0o755, None, 0o777, "kernels is writable by others (mode 0777)"),
}


@needs_cc
@pytest.mark.parametrize("case", [pytest.param(c, marks=root_only if HOSTILE[c][1] else ()) for c in HOSTILE])
def test_planted_libraries_in_a_writable_kernel_cache_never_run(tmp_path, case, evaluation_features):
    root_mode, owner, kernels_mode, refusal = HOSTILE[case]
    marker = tmp_path / "PWNED"
    library = planted_library(tmp_path, marker)
    assert runs_when_loaded(library, marker), "the planted library's constructor must work for this test to mean anything"
    home, kernels = tmp_path / "shared", tmp_path / "shared" / "kernels"
    home.mkdir()
    planted = plant(kernels, library)
    if owner is not None:
        chown_tree(kernels, owner)
    kernels.chmod(kernels_mode)
    home.chmod(root_mode)
    user_cache = tmp_path / "user_cache"

    info = run_vehiclenet("info", home=home, user_cache=user_cache)
    evaluated = run_vehiclenet("evaluate", "--features", str(evaluation_features), "--rerank", "--k1", "8",
                               "--k2", "3", "--json", home=home, user_cache=user_cache)

    assert not marker.exists(), marker.read_text()
    for proc in (info, evaluated):
        assert proc.returncode == 0, proc.stderr
        assert "Traceback" not in proc.stderr
        (warning,) = warnings_about(proc.stderr, kernels)  # one line, naming the folder and the fix
        assert refusal in warning, warning
        assert "chmod go-w" in warning or "point VEHICLENET_KERNEL_CACHE (or VEHICLENET_HOME) at a folder" in warning
        assert f"Using {user_cache / 'vehiclenet' / 'kernels'} instead" in warning
@needs_cc
def test_a_library_not_matching_its_record_is_built_again_not_loaded(tmp_path):
    marker = tmp_path / "PWNED"
    library = planted_library(tmp_path, marker)
    folder = tmp_path / "kernels"
    options = dict(compiler_env="CC", default_compiler="cc", build_dir=folder)
    built = native.build(native.RETRIEVAL_SOURCE, "retrieval_kernels", native.RETRIEVAL_FLAGS, **options)
    good = _sha256(built)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert cache_trust.digest_file(built).read_text() == f"{good}  {built.name}\n"

    for tamper in ("swapped, record kept", "swapped, record removed", "record rewritten by hand"):
        if tamper == "record rewritten by hand":
            cache_trust.digest_file(built).write_text(f"{'0' * 64}  {built.name}\n")
        else:
            shutil.copy(library, tmp_path / "swap.so")
            os.replace(tmp_path / "swap.so", built)  # a new file: this process has the built one loaded
            if tamper == "swapped, record removed":
                cache_trust.digest_file(built).unlink()
        assert native.find_built(native.RETRIEVAL_SOURCE, "retrieval_kernels", native.RETRIEVAL_FLAGS,
                                 **options) is None, tamper
        with pytest.raises(native.NativeBuildError, match="not loading"):
            native.load(built, native.RETRIEVAL_SYMBOLS)
        again = native.build(native.RETRIEVAL_SOURCE, "retrieval_kernels", native.RETRIEVAL_FLAGS, **options)
        assert again == built and _sha256(again) == good, tamper
        assert native.load(again, native.RETRIEVAL_SYMBOLS).VnTopK
    assert not marker.exists()


@needs_cc
def test_a_library_built_under_a_permissive_umask_is_used_again(tmp_path):
    """umask 002 (user-private groups) would make the library and its record group-writable,
    which the rule refuses: every run would compile again. They are written without g+w."""
    options = dict(compiler_env="CC", default_compiler="cc", build_dir=tmp_path / "kernels")
    old = os.umask(0o002)
    try:
        built = native.build(native.RETRIEVAL_SOURCE, "retrieval_kernels", native.RETRIEVAL_FLAGS, **options)
    finally:
        os.umask(old)
    assert stat.S_IMODE(built.stat().st_mode) == 0o755
    assert stat.S_IMODE(cache_trust.digest_file(built).stat().st_mode) == 0o644
    assert cache_trust.library_problem(built) is None
    assert native.find_built(native.RETRIEVAL_SOURCE, "retrieval_kernels", native.RETRIEVAL_FLAGS,
                             **options) == built


@needs_cc
def test_a_missing_function_or_a_library_that_fails_to_load_is_named_and_falls_back(
        tmp_path, evaluation_features):
    """A library in our own folder whose record matches (as if this user had put it there) but
    that lacks a function, or is no library at all: a named error, the numpy and MindSpore
    paths, no traceback."""
    source = tmp_path / "tiny.c"
    source.write_text("int VnTopK(void) { return 0; }\n")
    tiny = tmp_path / "tiny.so"
    subprocess.run(["cc", "-shared", "-fPIC", str(source), "-o", str(tiny)], check=True)
    home = tmp_path / "home"
    cpu, retrieval = plant(home / "kernels", tiny)
    retrieval.write_bytes(b"not an ELF file")
    cache_trust.write_digest(retrieval, _sha256(retrieval))
    info = run_vehiclenet("info", "--json", home=home, user_cache=tmp_path / "user_cache")
    evaluated = run_vehiclenet("evaluate", "--features", str(evaluation_features), "--rerank", "--k1", "8",
                               "--k2", "3", "--json", home=home, user_cache=tmp_path / "user_cache")
    for proc in (info, evaluated):
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    report = json.loads(info.stdout)
    assert report["cpu_kernels"].startswith("MindSpore's Conv2D"), report["cpu_kernels"]
    assert f"{cpu} has no VnConvS1, " in report["cpu_kernels"]  # named, with the first missing functions
    assert re.search(rf"retrieval kernels unavailable.*cannot load {re.escape(str(retrieval))}", evaluated.stderr)
    want = subprocess.run([sys.executable, "-m", "vehiclenet", "evaluate", "--features", str(evaluation_features),
                           "--rerank", "--k1", "8", "--k2", "3", "--json"], env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)  # with the compiled kernels
    got, expected = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (evaluated, want))
    metrics = ("mAP", "rank1", "rank5", "rank10", "mINP")
    assert {k: got[k] for k in metrics} == {k: expected[k] for k in metrics}, "numpy fallback, same results"


def test_the_symbol_lists_are_the_libraries_functions():
    """What load() checks is every function the sources export (a renamed one would otherwise
    only fail inside a graph)."""
    cc = cpu_kernels.SOURCE.read_text()
    exported = set(re.findall(r"^VN_[A-Z_]+\((Vn\w+),", cc, re.M))
    exported |= set(re.findall(r"^(?:int|int64_t|void) (Vn\w+)\(", cc.split('extern "C" {', 1)[1], re.M))
    assert exported == set(cpu_kernels.SYMBOLS)
    c = native.RETRIEVAL_SOURCE.read_text()
    exported = set(re.findall(r"^(?:int|void) (Vn\w+)\(", c, re.M)) | set(re.findall(r"^HIT_POSITIONS\((Vn\w+),", c, re.M))
    assert exported == set(native.RETRIEVAL_SYMBOLS)


# --------------------------------------------------------------------------- compiled graphs

GRAPH_CHILD = r"""
import json, logging, sys
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
import numpy as np, mindspore as ms
from vehiclenet import create_network
from vehiclenet.model.graph_key import graph_key
ckpt, batch = sys.argv[1], int(sys.argv[2])
net = create_network(checkpoint=ckpt, include_top=False, mode="graph")
x = ms.Tensor(np.random.default_rng(0).standard_normal((batch, 3, 64, 64)).astype(np.float32))
key = graph_key(net, (x,))
print(json.dumps({"key": key, "rows": int(net(x).shape[0])}))
"""


def _graph_run(tmp_path, ckpt, home, batch, user_cache):
    script = tmp_path / "graph_child.py"  # a file: MindSpore's cache reads the entry script
    script.write_text(GRAPH_CHILD)
    env = dict(os.environ, GLOG_v="3", VEHICLENET_HOME=str(home), XDG_CACHE_HOME=str(user_cache))
    proc = subprocess.run([sys.executable, str(script), str(ckpt), str(batch)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _poison(entries: Path, source_key: str, target_key: str) -> Path:
    """The batch-1 graph filed under the batch-2 key, its record re-signed for that key with the
    folder's own record key: what someone who can write (and so read) ``compiled/`` could do.
    MindSpore's cache does not check shapes."""
    from vehiclenet.model.compile_cache import _mac

    target = entries / target_key
    shutil.copytree(entries / source_key, target)
    (target / ".lock").unlink(missing_ok=True)
    record = json.loads((target / "files.json").read_text())
    secret = (entries / ".record-key").read_bytes()
    record.update(key=target_key, hmac=_mac(target_key, record["files"], secret))
    (target / "files.json").write_text(json.dumps(record))
    return target


@pytest.mark.slow
@root_only
def test_a_graph_in_a_compiled_folder_someone_else_owns_is_never_loaded(tmp_path, published_ckpt):
    own, user_cache = tmp_path / "own", tmp_path / "user_cache"
    one, _ = _graph_run(tmp_path, published_ckpt, own, 1, user_cache)
    two_key = _graph_run(tmp_path, published_ckpt, tmp_path / "scratch", 2, user_cache)[0]["key"]
    shutil.rmtree(user_cache, ignore_errors=True)
    # Control: in a folder of our own, the poisoned entry signed with that folder's key is served
    # (one row for two images), so two rows below mean it was not loaded.
    _poison(own / "compiled", one["key"], two_key)
    served, log = _graph_run(tmp_path, published_ckpt, own, 2, user_cache)
    assert served["rows"] == 1 and "compile cache hit" in log, "MindSpore no longer serves a poisoned entry"

    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copytree(own / "compiled", shared / "compiled")
    chown_tree(shared / "compiled", NOBODY)
    before = {p: _sha256(p) for p in (shared / "compiled").rglob("*") if p.is_file()}
    result, log = _graph_run(tmp_path, published_ckpt, shared, 2, user_cache)
    assert result["rows"] == 2
    (warning,) = [line for line in log.splitlines() if f"not loading compiled graphs from {shared / 'compiled'}" in line]
    assert "owned by uid 65534" in warning and f"Using {user_cache / 'vehiclenet' / 'compiled' / two_key} instead" in warning
    assert f"compile cache filled: {user_cache / 'vehiclenet' / 'compiled' / two_key}" in log
    assert {p: _sha256(p) for p in (shared / "compiled").rglob("*") if p.is_file()} == before
    assert stat.S_IMODE((user_cache / "vehiclenet" / "compiled").stat().st_mode) == 0o700


# --------------------------------------------------------------------------- the rule itself


def test_folders_are_created_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        folder = cache_trust.private_folder(tmp_path / "a" / "b" / "kernels", tmp_path / "a")
    finally:
        os.umask(old)
    for path in (tmp_path / "a", tmp_path / "a" / "b", folder):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


def test_writable_folders_are_refused_and_a_sticky_one_above_the_root_is_not(tmp_path):
    above = tmp_path / "above"
    root = above / "root"
    (root / "kernels").mkdir(parents=True)
    above.chmod(0o1777)  # like /tmp: others may write here, but not rename our folder away
    assert cache_trust.private_folder(root / "kernels", root) == root / "kernels"
    above.chmod(0o777)
    with pytest.raises(cache_trust.UntrustedFolder, match="above is writable by others without the sticky bit"):
        cache_trust.private_folder(root / "kernels", root)
    above.chmod(0o755)
    root.chmod(0o775)
    with pytest.raises(cache_trust.UntrustedFolder, match=r"root is writable by others \(mode 0775\); .*chmod go-w"):
        cache_trust.private_folder(root / "kernels", root)
    root.chmod(0o700)
    (root / "kernels").chmod(0o1777)  # below the root, not even with the sticky bit
    with pytest.raises(cache_trust.UntrustedFolder, match="kernels is writable by others"):
        cache_trust.private_folder(root / "kernels", root)


def test_a_link_below_the_root_is_refused_and_a_linked_root_is_resolved(tmp_path):
    real = tmp_path / "real"
    (real / "elsewhere").mkdir(parents=True)
    (real / "kernels").symlink_to(real / "elsewhere")
    with pytest.raises(cache_trust.UntrustedFolder, match="kernels is a symbolic link"):
        cache_trust.private_folder(real / "kernels", real)
    (tmp_path / "link").symlink_to(real)
    assert cache_trust.private_folder(tmp_path / "link" / "elsewhere", tmp_path / "link") == real / "elsewhere"


def test_checking_without_create_writes_nothing(tmp_path):
    target = tmp_path / "home" / "kernels"
    assert cache_trust.private_folder(target, tmp_path / "home", create=False) == target
    assert not (tmp_path / "home").exists()


@root_only
def test_a_folder_owned_by_another_user_is_refused_and_root_is_trusted(tmp_path):
    root = tmp_path / "root"
    (root / "kernels").mkdir(parents=True)
    os.chown(root / "kernels", OTHER_USER, OTHER_USER)
    with pytest.raises(cache_trust.UntrustedFolder, match=r"kernels is owned by uid 1 \(daemon\), not by you"):
        cache_trust.private_folder(root / "kernels", root)
    # Seen by that user, root's folders are trusted and its own is too.
    assert cache_trust.private_folder(root / "kernels", root, uid=OTHER_USER) == root / "kernels"


# --------------------------------------------------------------------------- as a plain user

def _as_nobody(check) -> dict:
    """Run ``check()`` in a forked child that has dropped to uid/gid nobody; its JSON result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        code = 0
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            result = check()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            result, code = {"error": f"{type(exc).__name__}: {exc}"}, 1
        os.write(write, json.dumps(result).encode())
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


@root_only
@needs_cc
def test_a_plain_user_loads_from_a_read_only_system_cache_and_never_from_another_users(tmp_path):
    """As nobody: a root-owned 0755 cache (the safe way to share one) is used; a folder owned
    by another plain user with a planted library (and its record) is refused, unrun."""
    top = Path(tempfile.mkdtemp(prefix="vn-plain-user-"))  # tmp_path's parents are root's own 0700
    try:
        top.chmod(0o755)
        marker = top / "PWNED"
        library = planted_library(top, marker)
        assert runs_when_loaded(library, marker)
        system = top / "system" / "kernels"
        system.parent.mkdir()
        shared = native.build(native.RETRIEVAL_SOURCE, "retrieval_kernels", native.RETRIEVAL_FLAGS,
                              compiler_env="CC", default_compiler="cc", build_dir=system)
        system.chmod(0o755)  # as an administrator shares it: root's, readable, writable by root alone
        foreign = top / "daemon" / "kernels"
        foreign.mkdir(parents=True)
        planted = foreign / shared.name
        shutil.copy(library, planted)
        cache_trust.write_digest(planted, _sha256(planted))
        chown_tree(top / "daemon", OTHER_USER)
        top.joinpath("mine").mkdir()
        top.joinpath("mine").chmod(0o1777)

        def check():
            out = {"system": native.load(shared, native.RETRIEVAL_SYMBOLS) is not None}
            try:
                native.load(planted, native.RETRIEVAL_SYMBOLS)
                out["foreign"] = "loaded"
            except native.NativeBuildError as exc:
                out["foreign"] = str(exc)
            made = cache_trust.private_folder(top / "mine" / "home" / "kernels", top / "mine" / "home")
            st = made.stat()
            out["made"] = [st.st_uid, stat.S_IMODE(st.st_mode)]
            return out

        result = _as_nobody(check)
        assert result.get("system") is True, result
        assert "daemon is owned by uid 1 (daemon), not by you (uid 65534 (nobody)) or root" in result["foreign"], result
        assert result["made"] == [NOBODY, 0o700]
        assert not marker.exists()
    finally:
        shutil.rmtree(top, ignore_errors=True)
