"""The mindspore_hub protocol, run the way the hub runs it, and device selection on CPU."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_hub_card_is_valid_hub_format():
    card = (REPO / "hub" / "vehiclenet_vehiclenetdataset.md").read_text()
    header = card.split("---")[1]
    keys = {line.split(":", 1)[0].strip() for line in header.splitlines() if ":" in line}
    for key in ("model-name", "backbone-name", "module-type", "fine-tunable", "model-version", "train-dataset",
                "evaluation", "author", "update-time", "repo-link", "user-id", "used-for",
                "mindspore-version", "asset", "file-format", "asset-link", "asset-sha256", "license", "summary"):
        assert key in keys, key
    manifest = json.loads((REPO / "assets.json").read_text())
    assert manifest["assets"][0]["sha256"] in card


def test_mindspore_hub_conf_loaded_by_path_like_the_hub(tmp_path, published_ckpt):
    """Lay out D/<card>.md + D/<repo-link basename>/ as mindspore_hub does for
    source="local", put the model folder first on sys.path, execute
    mindspore_hub_conf.py by path, call create_network(model_name) and apply the
    weights the way the hub does (load_param_into_net(net, load_checkpoint(path)))."""
    hub_dir = tmp_path / "hub"
    model_dir = hub_dir / "VehicleNet"  # basename of the card's repo-link
    model_dir.mkdir(parents=True)
    shutil.copy(REPO / "hub" / "vehiclenet_vehiclenetdataset.md", hub_dir)
    shutil.copy(REPO / "mindspore_hub_conf.py", model_dir)
    shutil.copytree(REPO / "vehiclenet", model_dir / "vehiclenet", symlinks=False)
    env = dict(os.environ, PYTHONPATH="")  # the package must come from the model folder
    proc = _run(f"""
        import importlib.util, sys
        model_dir = {str(model_dir)!r}
        sys.path.insert(0, model_dir)
        spec = importlib.util.spec_from_file_location("mindspore_hub_conf", model_dir + "/mindspore_hub_conf.py")
        conf = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(conf)
        import mindspore as ms
        net = conf.create_network("VehicleNet".lower())
        assert isinstance(net, ms.nn.Cell), type(net)
        import vehiclenet
        assert vehiclenet.__file__.startswith(model_dir), vehiclenet.__file__
        not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint({str(published_ckpt)!r}))
        assert not_loaded == [], not_loaded
        emb = conf.create_network("vehiclenet", include_top=False)
        out = emb(ms.Tensor(ms.numpy.zeros((1, 3, 128, 128), ms.float32)))
        try:
            conf.create_network("vehiclenet", 10)
        except TypeError as exc:
            assert "by keyword" in str(exc), exc
        else:
            raise AssertionError("positional option accepted")
        print("OK", type(net).__name__, out.shape)
    """, cwd=tmp_path, env=env)
    assert "OK VehicleNet (1, 512)" in proc.stdout


def test_device_selection_on_cpu():
    proc = _run("""
        import logging
        logging.basicConfig(level=logging.INFO)
        from vehiclenet import device
        assert device.choose_device() == "CPU"            # no Ascend, no GPU here
        assert device.choose_device("cpu") == "CPU"       # case-insensitive
        assert device.choose_device("Ascend") == "Ascend" # explicit wins over detection
        try:
            device.choose_device("TPU")
        except ValueError as exc:
            assert "TPU" in str(exc)
        else:
            raise AssertionError("TPU accepted")
        assert device.default_amp_level("Ascend") == "O2"
        assert device.default_amp_level("CPU") == "O0"
        assert device.device_already_set() is None
        assert device.configure(None, "graph") == "CPU"
        assert device.device_already_set() == "CPU"
        import mindspore as ms
        assert ms.get_context("mode") == ms.GRAPH_MODE
        try:
            device.configure("GPU")
        except ValueError as exc:
            assert "already set 'CPU'" in str(exc)
        else:
            raise AssertionError("device change accepted")
        print("OK")
    """, cwd=REPO)
    assert "OK" in proc.stdout
    assert "device: CPU (chosen automatically)" in proc.stderr


def test_device_set_by_the_process_is_respected():
    proc = _run("""
        import logging
        logging.basicConfig(level=logging.INFO)
        import mindspore as ms
        ms.set_device("CPU")
        from vehiclenet import create_network
        net = create_network(pretrained=False, mode="pynative")
        assert ms.get_context("mode") == ms.PYNATIVE_MODE
        print("OK")
    """, cwd=REPO)
    assert "device: CPU (set by the process)" in proc.stderr


def test_device_of_operations_run_before_is_respected():
    """MindSpore refuses set_device once kernels ran; create_network must go along, not crash."""
    proc = _run("""
        import logging
        logging.basicConfig(level=logging.INFO)
        import mindspore as ms
        import numpy as np
        assert ms.Tensor(np.ones(3, np.float32)).sum().asnumpy() == 3
        from vehiclenet import create_network
        net = create_network(pretrained=False, include_top=False, mode="pynative")
        out = net(ms.Tensor(np.zeros((1, 3, 64, 64), np.float32)))
        assert out.shape == (1, 512)
        net = create_network(pretrained=False, include_top=False)  # no mode: the process's mode is kept
        assert ms.get_context("mode") == ms.PYNATIVE_MODE
        net = create_network(pretrained=False, include_top=False, mode="graph")  # and again, now in graph mode
        assert ms.get_context("mode") == ms.GRAPH_MODE
        print("OK")
    """, cwd=REPO)
    assert "OK" in proc.stdout
    assert proc.stderr.count("device: CPU (set by the process)") == 3


def test_cli_and_export_build_in_graph_mode():
    """The command line keeps compiling its networks whatever create_network's default is."""
    proc = _run("""
        import mindspore as ms
        from vehiclenet import cli, export
        assert ms.get_context("mode") == ms.PYNATIVE_MODE
        cli._build_network(None, False, "fp32")
        assert ms.get_context("mode") == ms.GRAPH_MODE
        ms.set_context(mode=ms.PYNATIVE_MODE)
        export.build_embedding_network(pretrained=False)
        assert ms.get_context("mode") == ms.GRAPH_MODE
        print("OK")
    """, cwd=REPO)
    assert "OK" in proc.stdout


def test_pretrained_without_download_source_fails_clearly(monkeypatch, tmp_path):
    """Offline with an empty cache: an error that says how to get the weights, never random weights."""
    from vehiclenet import create_network
    from vehiclenet.errors import VehicleNetError

    monkeypatch.setenv("VEHICLENET_OFFLINE", "1")
    with pytest.raises(VehicleNetError) as err:
        create_network()
    assert "VEHICLENET_OFFLINE" in str(err.value) or "offline" in str(err.value).lower()
