"""The mindspore_hub protocol, run the way the hub runs it, and device selection on CPU."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
        # Called directly (no mindspore_hub.load above it): built exactly as asked, num_classes by position.
        ten = conf.create_network("vehiclenet", 10)
        assert ten.classifier.classifier.weight.shape == (10, 512), ten.classifier.classifier.weight.shape
        try:
            conf.create_network("vehiclenet", 10, False)
        except TypeError as exc:
            assert "by keyword" in str(exc) and "include_top=False" in str(exc), exc
        else:
            raise AssertionError("second positional option accepted")
        print("OK", type(net).__name__, out.shape)
    """, cwd=tmp_path, env=env)
    assert "OK VehicleNet (1, 512)" in proc.stdout


def test_device_selection_on_cpu():
    proc = _run("""
        import logging
        logging.basicConfig(level=logging.INFO)
        from vehiclenet.model import device
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


def test_pretrained_without_download_source_fails_clearly(monkeypatch, tmp_path):
    """Offline with an empty cache: an error that says how to get the weights, never random weights."""
    from vehiclenet import create_network
    from vehiclenet.errors import VehicleNetError

    monkeypatch.setenv("VEHICLENET_OFFLINE", "1")
    with pytest.raises(VehicleNetError) as err:
        create_network()
    assert "VEHICLENET_OFFLINE" in str(err.value) or "offline" in str(err.value).lower()


# --------------------------------------------------------------------------- through mindspore_hub.load
# tests/hub_client/mindspore_hub is a stand-in reproducing the measured source="local" flow of
# the mindspore_hub 2.0.0 client (the real one is not installable here): it executes the conf
# by path from D/<repo-link basename>/, calls create_network(name.lower(), *args, **kwargs) and,
# when pretrained, load_param_into_net(net, load_checkpoint(D/<asset file>)).

HUB_CLIENT = Path(__file__).resolve().parents[1] / "hub_client"
CARD = REPO / "hub" / "vehiclenet_vehiclenetdataset.md"
CHECKED = ["model.layer3.5.conv2.weight", "classifier.classifier.weight"]  # a backbone entry and the head


def _card_field(text: str, key: str) -> str:
    return next(line.split(":", 1)[1].strip().strip("<>") for line in text.splitlines()
                if line.strip().lstrip("-").strip().startswith(key + ":"))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system
        shutil.copy(src, dst)


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory, published_ckpt) -> dict:
    """D/vehiclenet_vehiclenetdataset.md + D/VehicleNet/ (this package) + D/<asset file>
    (the generated published-layout checkpoint), as source="local" expects; plus a
    second card naming a model this package does not provide."""
    hub_dir = tmp_path_factory.mktemp("hub")
    text = CARD.read_text()
    model_dir = hub_dir / os.path.basename(_card_field(text, "repo-link"))
    model_dir.mkdir()
    shutil.copy(REPO / "mindspore_hub_conf.py", model_dir)
    shutil.copytree(REPO / "vehiclenet", model_dir / "vehiclenet", ignore=shutil.ignore_patterns("__pycache__"))
    card = hub_dir / CARD.name
    card.write_text(text)
    asset = hub_dir / os.path.basename(_card_field(text, "asset-link"))
    _link_or_copy(published_ckpt, asset)
    other = hub_dir / "resnet50_vehiclenetdataset.md"
    other.write_text(text.replace("model-name: VehicleNet", "model-name: ResNet50"))
    return {"card": str(card), "asset": str(asset), "model_dir": str(model_dir), "other_card": str(other)}


PRELUDE = '''
import json, os, sys
import numpy as np
import mindspore as ms
import mindspore_hub
L = json.loads(sys.argv[1])
CARD, ASSET = L["card"], L["asset"]
WANT = ms.load_checkpoint(ASSET, specify_prefix=%r)

def params(net):
    return {p.name: p.asnumpy() for p in net.get_parameters()}

def same_as_asset(net, names):
    got = params(net)
    return all(np.array_equal(got[n], WANT[n].asnumpy()) for n in names)

def raised(exc_type, *args, **kwargs):
    try:
        mindspore_hub.load(*args, **kwargs)
    except exc_type as exc:
        return str(exc)
    raise AssertionError(f"no {exc_type.__name__} for load{args}{kwargs}")

def nothing_built():
    from vehiclenet.model.device import device_already_set  # the model folder's package, imported by the conf
    return device_already_set() is None
''' % (CHECKED,)


def _hub_run(script: str, layout: dict, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that finds only the stand-in client on its path
    (the vehiclenet package must come from the model folder, as under the real hub)."""
    full_env = dict(os.environ, PYTHONPATH=str(HUB_CLIENT), **env)
    code = PRELUDE + textwrap.dedent(script)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(layout)], cwd=tmp_path, env=full_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def test_hub_load_positional_num_classes_and_model_names(hub_layout, tmp_path):
    """Item 5: load(card, 575) reaches create_network("vehiclenet", 575); more positionals fail
    naming the keywords (never pretrained, which the hub keeps); another model name fails
    like the hub's own conf files."""
    proc = _hub_run('''
        net = mindspore_hub.load(CARD, source="local")                # the hub's defaults: card's weights
        import vehiclenet
        assert vehiclenet.__file__.startswith(L["model_dir"]), vehiclenet.__file__
        assert same_as_asset(net, WANT), "card's weights not loaded"
        pos = mindspore_hub.load(CARD, 575, source="local")           # class count by position
        assert pos.classifier.classifier.weight.shape == (575, 512)
        assert same_as_asset(pos, WANT)

        msg = raised(TypeError, CARD, 575, False, source="local")
        print("TOO MANY:", msg)
        assert "only num_classes may be given by position" in msg and "include_top=False" in msg, msg
        assert "pretrained" not in msg, msg
        msg = raised(TypeError, CARD, True, source="local")           # not a class count
        assert "the positional argument is num_classes" in msg and "pretrained" not in msg, msg
        msg = raised(TypeError, CARD, 575, source="local", num_classes=575)
        assert "num_classes given twice" in msg, msg
        msg = raised(NotImplementedError, L["other_card"], source="local")
        assert msg == "resnet50 is not implemented in the repo", msg
        print("OK")
    ''', hub_layout, tmp_path)
    assert "OK" in proc.stdout


@pytest.fixture
def own_manifest(tmp_path, monkeypatch, published_ckpt) -> str:
    """A manifest whose default asset is the generated checkpoint, already in the cache,
    offline: ``weights=True`` then loads it verified without any network."""
    import hashlib

    from support.http_server import write_manifest
    from vehiclenet.weights.download import cached_path

    sha = hashlib.sha256()
    with open(published_ckpt, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            sha.update(chunk)
    entry = {"name": "vehiclenet_hubtest", "file": "vehiclenet_hubtest.ckpt", "sha256": sha.hexdigest(),
             "urls": ["https://example.invalid/vehiclenet_hubtest.ckpt"], "size": published_ckpt.stat().st_size,
             "num_classes": 575}
    folder = tmp_path / "manifest"
    folder.mkdir()
    manifest = write_manifest(folder, [entry])
    monkeypatch.setenv("VEHICLENET_ASSETS", str(manifest))
    monkeypatch.setenv("VEHICLENET_OFFLINE", "1")
    cached = cached_path("vehiclenet_hubtest")
    cached.parent.mkdir(parents=True, exist_ok=True)
    _link_or_copy(published_ckpt, cached)
    return str(manifest)


def test_hub_num_classes_under_default_pretrained(hub_layout, own_manifest, tmp_path):
    """Item 2: another head under the hub's pretrained=True fails before anything is built,
    saying what to pass; what it says works (published backbone, new 10-class head)."""
    proc = _hub_run('''
        msg = raised(ValueError, CARD, source="local", num_classes=10)
        print("NUM_CLASSES:", msg)
        assert nothing_built(), "the network was built before the error"
        fix = f"mindspore_hub.load({CARD!r}, source='local', num_classes=10, pretrained=False, weights=True)"
        assert fix in msg and "575-class checkpoint into a 10-class head" in msg, msg

        net = mindspore_hub.load(CARD, source="local", num_classes=10, pretrained=False, weights=True)
        assert net.classifier.classifier.weight.shape == (10, 512)
        assert same_as_asset(net, ["model.layer3.5.conv2.weight"]), "published backbone not loaded"

        msg = raised(ValueError, CARD, source="local", weights=True)
        assert "pretrained=False" in msg and "weights=True" in msg, msg

        emb = mindspore_hub.load(CARD, source="local", num_classes=10, include_top=False)  # no head: nothing to clash
        assert same_as_asset(emb, ["model.layer3.5.conv2.weight"])
        same = mindspore_hub.load(CARD, source="local", num_classes=575)                   # the card's own head
        assert same_as_asset(same, WANT)
        print("OK")
    ''', hub_layout, tmp_path)
    assert "OK" in proc.stdout


def test_hub_checkpoint_under_default_pretrained(hub_layout, tmp_path):
    """Item 3: checkpoint= under the hub's pretrained=True fails at once instead of being
    overwritten by the card's weights; with pretrained=False the user's file is what loads."""
    mine = tmp_path / "mine.ckpt"
    proc = _hub_run(f'''
        MINE = {str(mine)!r}
        msg = raised(ValueError, CARD, source="local", checkpoint=MINE)
        print("CHECKPOINT:", msg)
        assert nothing_built(), "the network was built before the error"
        fix = f"mindspore_hub.load({{CARD!r}}, source='local', checkpoint={{MINE!r}}, pretrained=False)"
        assert fix in msg and "over " + MINE in msg, msg

        rand = mindspore_hub.load(CARD, source="local", num_classes=10, pretrained=False)  # random, no weights
        assert not same_as_asset(rand, ["model.layer3.5.conv2.weight"])
        ms.save_checkpoint(rand, MINE)
        net = mindspore_hub.load(CARD, source="local", checkpoint=MINE, num_classes=10, pretrained=False)
        got, want = params(net), params(rand)
        assert all(np.array_equal(got[n], want[n]) for n in want), "not the user's weights"
        print("OK")
    ''', hub_layout, tmp_path)
    assert "OK" in proc.stdout


def test_hub_load_keeps_the_execution_mode(hub_layout, tmp_path):
    """Item 4: a load keeps the process's mode (MindSpore 2.8 starts in PyNative); mode= sets it."""
    proc = _hub_run('''
        assert ms.get_context("mode") == ms.PYNATIVE_MODE
        emb = mindspore_hub.load(CARD, source="local", include_top=False)
        assert ms.get_context("mode") == ms.PYNATIVE_MODE, "PyNative switched to graph"
        out = emb(ms.Tensor(np.zeros((1, 3, 64, 64), np.float32)))
        assert out.shape == (1, 512)
        ms.set_context(mode=ms.GRAPH_MODE)
        mindspore_hub.load(CARD, source="local", include_top=False, pretrained=False)
        assert ms.get_context("mode") == ms.GRAPH_MODE, "graph switched to PyNative"
        ms.set_context(mode=ms.PYNATIVE_MODE)
        mindspore_hub.load(CARD, source="local", include_top=False, pretrained=False, mode="graph")
        assert ms.get_context("mode") == ms.GRAPH_MODE, "mode='graph' not applied"
        print("OK")
    ''', hub_layout, tmp_path)
    assert "OK" in proc.stdout


def test_cli_and_export_choose_their_mode():
    """The command line sets the mode its job wants whatever create_network's default is:
    graph for many images and for export, PyNative for a handful of images."""
    proc = _run("""
        import mindspore as ms
        from vehiclenet.model import export
        from vehiclenet.cli._network import build_network
        from vehiclenet.model.device import mode_for_images
        from vehiclenet.weights.choice import WeightsChoice
        assert ms.get_context("mode") == ms.PYNATIVE_MODE
        build_network(WeightsChoice(pretrained=False), "fp32", mode=mode_for_images(100))
        assert ms.get_context("mode") == ms.GRAPH_MODE
        build_network(WeightsChoice(pretrained=False), "fp32", mode=mode_for_images(1))
        assert ms.get_context("mode") == ms.PYNATIVE_MODE
        export.build_embedding_network(pretrained=False)
        assert ms.get_context("mode") == ms.GRAPH_MODE
        print("OK")
    """, cwd=REPO)
    assert "OK" in proc.stdout


def test_hub_load_on_cpu_prints_no_device_probe_warning(hub_layout, tmp_path):
    """Item 6: a load on a CPU-only machine prints nothing about absent Ascend/GPU plugins."""
    proc = _hub_run('''
        import logging
        logging.basicConfig(level=logging.INFO)
        net = mindspore_hub.load(CARD, source="local")
        from vehiclenet.model import device
        # The plugin check answers first: the noisy probe is not even called.
        calls = []
        ms.device_context.ascend.is_available = lambda: calls.append(1) or False
        assert device._usable("Ascend") is False and calls == []
        # A probe that remains is quiet too, and MindSpore's logger gets its level back.
        from mindspore.log import _get_logger
        level = _get_logger().level
        with device._quiet_mindspore():
            assert ms.device_context.gpu.is_available() is False  # probes, and would log ~3 lines
        assert _get_logger().level == level
        print("OK")
    ''', hub_layout, tmp_path)
    out = proc.stdout + proc.stderr
    assert "OK" in proc.stdout
    assert "device: CPU (chosen automatically)" in proc.stderr  # the choice was made in this process
    assert "Use local directory" in proc.stderr  # stderr is captured: the client's own warning is there
    for probe_line in ("is not available", "plugin", "libmindspore_ascend", "Device Ascend", "Device GPU"):
        assert probe_line not in out, out[-3000:]
