"""Fixtures every test folder shares: generated checkpoints, a real HTTP server, a served asset
with its cache (the hostile cases' site), and each test's own cache and execution mode.

The tests are grouped by the package's wings (``weights/``, ``model/``, ``embedding/``,
``retrieval/``, ``datasets/``, ``training/``) and ``package/`` for what spans them (layout,
docs, packaging, outputs, interrupts, the options every command shares); hostile cases sit
beside the feature they attack. Helpers several files use are in ``support/``.
"""
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from support.threads import share_the_cores_among_workers

# Under pytest-xdist each worker, and every process it starts, gets an equal share of the cores for
# its OpenMP and BLAS threads (unless OMP_NUM_THREADS is set already): with a thread per core in
# every worker, on the 2-core development machine a training step of two processes side by side
# took 3.5x as long as with one thread each. Before numpy, MindSpore or OpenMP read the setting.
# Several threads are still tested: test_cpu_kernels.py::test_the_kernels_on_several_threads_agree_with_one.
share_the_cores_among_workers()

from support.checkpoints import write_published_layout  # noqa: E402
from support.http_server import Route, asset_entry, http_server, write_manifest  # noqa: E402,F401 (a fixture)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory) -> Path:
    """The network entries (no training state) of a seeded random VehicleNet with the published
    575-class head: ~100 MB, loads in about a second. One file for the whole session."""
    import mindspore as ms

    from vehiclenet import create_network

    path = tmp_path_factory.mktemp("ckpt") / "net_only.ckpt"
    ms.save_checkpoint(create_network(pretrained=False, seed=0), str(path))
    return path


@pytest.fixture
def site(tmp_path, http_server):
    """A served asset, its manifest, an empty cache and a folder of victims outside the cache."""
    from support.hostile import FILE, PAYLOAD, env_without_network_settings

    url = http_server.add("/w.ckpt", Route(body=PAYLOAD))
    manifest = write_manifest(tmp_path, [asset_entry("w", FILE, PAYLOAD, [url], size=len(PAYLOAD))])
    cache = tmp_path / "cache"
    victims = tmp_path / "victims"
    victims.mkdir()
    env = env_without_network_settings(VEHICLENET_ASSETS=str(manifest), VEHICLENET_HOME=str(cache))
    return SimpleNamespace(url=url, cache=cache, victims=victims, env=env, server=http_server, tmp=tmp_path)


@pytest.fixture(scope="session")
def published_ckpt(tmp_path_factory) -> Path:
    """A full-size (~300 MB) checkpoint in the published layout, random values."""
    return write_published_layout(tmp_path_factory.mktemp("ckpt") / "published_layout.ckpt")


@pytest.fixture(scope="session", autouse=True)
def _session_kernel_cache(tmp_path_factory):
    """The compiled kernels of the whole session in one folder of its own (also for the CLI
    subprocesses, which inherit the variable): compiled once, not once per test's cache root."""
    base = tmp_path_factory.getbasetemp()
    # Under pytest-xdist every worker has its own base folder inside the run's: the workers share
    # one kernel folder there (builds are locked), so the kernels are compiled once per run.
    kernels = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "kernels"
    kernels.mkdir(mode=0o700, exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VEHICLENET_KERNEL_CACHE", str(kernels))
        # The platform's user cache folder (where compiled code goes when a cache folder is
        # refused, and where ONNX Runtime keeps its files) is the session's own too.
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("user_cache")))
        yield


@pytest.fixture(autouse=True)
def _execution_mode_restored():
    """A test that sets MindSpore's execution mode (``create_network(mode=...)``) leaves the next
    test the mode it found: no test's outcome may depend on which tests ran before it."""
    import sys

    before = sys.modules["mindspore"].get_context("mode") if "mindspore" in sys.modules else None
    yield
    ms = sys.modules.get("mindspore")
    if ms is not None:
        ms.set_context(mode=ms.PYNATIVE_MODE if before is None else before)


@pytest.fixture(autouse=True)
def _no_hook_left_registered(request):
    """A hook registered in a worker, even removed, makes every later graph in that process
    unkeyable (the compile cache is skipped): the test that registers one must do so in a
    process of its own, so it fails here rather than a later test on the same worker."""
    import sys

    yield
    handles = sys.modules.get("mindspore.common.hook_handle")
    if handles is not None and handles._hook_version():
        pytest.fail(f"{request.node.nodeid} registered a MindSpore hook in the test process; "
                    "register it in a subprocess (see test_a_hook_even_removed_means_no_graph_key_in_that_process)")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test touches the user's cache or the network: every test gets its own cache."""
    monkeypatch.setenv("VEHICLENET_HOME", str(tmp_path / "vehiclenet_home"))
    logging.getLogger("vehiclenet").setLevel(logging.INFO)
