"""Fine-tuning: data scanning, schedule, a real short training run, checkpoints, resume, CLI, bad input."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vehiclenet.errors import DataError

from support.training import TINY, make_dataset, make_query_gallery

ROOT = Path(__file__).resolve().parents[2]
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "vehicles")


def _entry(path, name):
    from vehiclenet.model.checkpoint import read_checkpoint

    return read_checkpoint(path, keep_training_state=True)[name].asnumpy()


@pytest.mark.slow
def test_finetune_loss_falls_checkpoints_reload_and_resume(tiny_data, tmp_path, caplog, capfd):
    from vehiclenet import create_network
    from vehiclenet.training import finetune as ft
    from vehiclenet.model.checkpoint import load_weights
    from vehiclenet.model.network import VehicleNet

    out = tmp_path / "run"
    first = ft.finetune(tiny_data, out, epochs=4, keep_max=2, **TINY)
    losses = [s.loss for s in first.history]
    assert [s.epoch for s in first.history] == [1, 2, 3, 4]
    assert [s.step for s in first.history] == [4, 8, 12, 16]  # 24 images / batch 6
    assert losses[0] > 0.9  # ~ln 3 from random weights
    assert np.mean(losses[-2:]) < 0.8 * losses[0], losses
    assert all(s.images_per_second > 0 for s in first.history)

    # keep_max=2: only the newest two survive; labels.json sits next to them.
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["vehiclenet-e003.ckpt", "vehiclenet-e004.ckpt"]
    labels = json.loads((out / "labels.json").read_text())
    assert labels["identities"] == ["0001", "0002", "0003"] and labels["num_classes"] == 3
    last = out / "vehiclenet-e004.ckpt"
    from vehiclenet.fileio import current_umask

    for written in (last, out / "labels.json"):  # one rule: MindSpore's 0400 is not kept
        assert os.stat(written).st_mode & 0o777 == 0o666 & ~current_umask(), written
    assert int(_entry(last, "epoch_num")) == 4 and int(_entry(last, "step_num")) == 16
    assert int(_entry(last, "global_step").reshape(-1)[0]) == 16

    # The checkpoint loads into a fresh 3-class network with nothing missing or re-initialised.
    report = load_weights(VehicleNet(num_classes=3), last)
    net_names = {p.name for p in VehicleNet(num_classes=3).get_parameters()}
    assert set(report.loaded) == net_names and not report.reinitialized and not report.unused
    assert any(n.startswith("accum.") for n in report.training_state)
    net = create_network(checkpoint=last, num_classes=3)
    np.testing.assert_array_equal(net.classifier.classifier.weight.asnumpy(),
                                  _entry(last, "classifier.classifier.weight"))
    # Training moved the weights between epochs 3 and 4.
    assert not np.allclose(_entry(out / "vehiclenet-e003.ckpt", "classifier.dense.weight"),
                           _entry(last, "classifier.dense.weight"))

    # resume_training restores weights, SGD state and position into a fresh train step.
    data = ft.scan_training_data(tiny_data)
    fresh = VehicleNet(num_classes=3)
    opt = ft.create_optimizer(fresh, ft.lr_schedule(0.003, 4, 6))
    step = ft.build_train_step(fresh, opt)
    caplog.clear()
    capfd.readouterr()  # only what resuming prints counts below
    with caplog.at_level(logging.WARNING, logger="vehiclenet"):
        assert ft.resume_training(step, opt, last) == (4, 16)
    # Same lr: the saved and the rebuilt schedule agree at step 16; and MindSpore is not left
    # warning that the schedule entries we rebuild on purpose were "not loaded".
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "not loaded" not in capfd.readouterr().err
    assert int(opt.global_step.asnumpy().reshape(-1)[0]) == 16
    accum = {p.name: p for p in opt.get_parameters()}["accum.classifier.dense.weight"].asnumpy()
    np.testing.assert_array_equal(accum, _entry(last, "accum.classifier.dense.weight"))
    assert np.abs(accum).max() > 0
    assert data.num_classes == 3

    # Another base lr: resuming still works, and says that the schedule changed, with both rates.
    other = ft.create_optimizer(fresh, ft.lr_schedule(0.03, 4, 6))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vehiclenet"):
        ft.resume_training(ft.build_train_step(fresh, other), other, last)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2 and all(w.startswith(str(last)) for w in warnings), warnings
    assert "learning_rate_group_1 at step 16 was 0.0003, this run's schedule gives 0.003" in caplog.text
    rates = {p.name: p.asnumpy() for p in other.get_parameters()}
    np.testing.assert_allclose(rates["learning_rate_group_1"], ft.lr_schedule(0.03, 4, 6), rtol=1e-6)

    # Resuming continues at epoch 5, step 17, from the trained weights (loss already low).
    second = ft.finetune(tiny_data, out, epochs=6, keep_max=2, resume=last, **TINY)
    assert second.start_epoch == 4
    assert [(s.epoch, s.step) for s in second.history] == [(5, 20), (6, 24)]
    assert second.history[0].loss < 0.8 * losses[0]
    final = out / "vehiclenet-e006.ckpt"
    assert int(_entry(final, "epoch_num")) == 6 and int(_entry(final, "step_num")) == 24
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["vehiclenet-e005.ckpt", "vehiclenet-e006.ckpt"]


def test_scan_layouts_and_label_map(tmp_path):
    from vehiclenet.training import finetune as ft

    folders = ft.scan_training_data(make_dataset(tmp_path / "f", n_ids=3, per_id=2, size=40))
    assert folders.layout == "folders" and folders.identities == ["0001", "0002", "0003"]
    assert list(folders.labels) == [0, 0, 1, 1, 2, 2]
    veri = ft.scan_training_data(make_dataset(tmp_path / "v", n_ids=2, per_id=3, size=40, veri=True))
    assert veri.layout == "veri" and veri.identities == ["1", "2"]  # id = int(VVVV)
    assert list(veri.labels) == [0, 0, 0, 1, 1, 1]
    path = ft.save_label_map(veri, tmp_path / "out")
    assert path.name == "labels.json" and ft.load_label_map(tmp_path / "out") == ["1", "2"]


def test_bad_training_data_raises_clear_errors(tmp_path):
    from vehiclenet.training import finetune as ft

    with pytest.raises(DataError, match="does not exist") as err:
        ft.scan_training_data(tmp_path / "nowhere")
    assert "nowhere" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no training images found"):
        ft.scan_training_data(tmp_path / "empty")
    one = make_dataset(tmp_path / "one", n_ids=1, per_id=2, size=40)
    with pytest.raises(DataError, match="single identity.*at least two"):
        ft.scan_training_data(one)
    bad = make_dataset(tmp_path / "bad", n_ids=2, per_id=2, size=40)
    (bad / "0002" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(DataError, match="cannot be decoded") as err:
        ft.scan_training_data(bad)
    assert str(bad / "0002" / "broken.jpg") in str(err.value)
    few = ft.scan_training_data(make_dataset(tmp_path / "few", n_ids=2, per_id=2, size=40))
    with pytest.raises(DataError, match="fewer than one batch"):
        ft.build_train_dataset(few, batch_size=8, image_size=64)


@pytest.mark.slow
def test_an_earlier_run_is_never_overwritten_or_pruned(tiny_data, tmp_path):
    from vehiclenet.training import finetune as ft
    from vehiclenet.errors import CheckpointError, UsageError

    out = tmp_path / "run"
    ft.finetune(tiny_data, out, epochs=3, keep_max=5, max_steps_per_epoch=1, **TINY)
    names = ["vehiclenet-e001.ckpt", "vehiclenet-e002.ckpt", "vehiclenet-e003.ckpt"]
    assert sorted(p.name for p in out.glob("*.ckpt")) == names
    labels = (out / "labels.json").read_bytes()

    # A new run into that folder, or one that continues another folder's run: refused up front.
    with pytest.raises(UsageError, match="already holds the checkpoints of a run") as err:
        ft.finetune(tiny_data, out, epochs=1, keep_max=1, **TINY)
    assert f"--resume {out / 'vehiclenet-e003.ckpt'}" in str(err.value)
    elsewhere = tmp_path / "elsewhere.ckpt"
    elsewhere.write_bytes((out / "vehiclenet-e001.ckpt").read_bytes())
    with pytest.raises(UsageError, match="already holds"):
        ft.finetune(tiny_data, out, epochs=4, resume=elsewhere, **TINY)
    # Continuing it with other identities: refused, naming the label map.
    other = make_dataset(tmp_path / "other", n_ids=3, seed=7)
    for i, folder in enumerate(sorted(p for p in other.iterdir()), 11):
        folder.rename(other / f"{i:04d}")
    with pytest.raises(DataError, match="other identities") as err:
        ft.finetune(other, out, epochs=4, resume=out / "vehiclenet-e003.ckpt", **TINY)
    assert str(out / "labels.json") in str(err.value)
    # --resume naming the folder points at its newest checkpoint.
    with pytest.raises(CheckpointError, match="is a folder") as err:
        ft.finetune(tiny_data, out, epochs=4, resume=out, **TINY)
    assert "vehiclenet-e003.ckpt" in str(err.value)
    assert sorted(p.name for p in out.glob("*.ckpt")) == names and (out / "labels.json").read_bytes() == labels

    # Resuming from an older checkpoint with keep_max=1: the file just written is the one kept.
    result = ft.finetune(tiny_data, out, epochs=2, keep_max=1, max_steps_per_epoch=1,
                         resume=out / "vehiclenet-e001.ckpt", **TINY)
    assert result.checkpoints == [str(out / "vehiclenet-e002.ckpt")]
    assert sorted(p.name for p in out.glob("*.ckpt")) == ["vehiclenet-e002.ckpt"]


def test_bad_run_arguments_are_refused_before_anything_is_written(tiny_data, tmp_path):
    from vehiclenet.training import finetune as ft
    from vehiclenet.errors import UsageError

    out = tmp_path / "out"
    args = dict(TINY, epochs=4)
    for change, message in ((dict(lr=-1.0), "--lr"), (dict(lr=float("nan")), "--lr"),
                            (dict(warmup_epochs=-3), "--warmup-epochs"), (dict(decay_epochs=[0]), "--decay-epochs"),
                            (dict(decay_epochs=[9]), "--decay-epochs"), (dict(image_size=16), "--image-size"),
                            (dict(keep_max=0), "--keep-max"), (dict(num_workers=0), "--num-workers"),
                            (dict(eval_every=1), "--eval-data"), (dict(resume=out, checkpoint=out), "--checkpoint"),
                            (dict(precision="fp16"), "fp16")):
        with pytest.raises(UsageError, match=message):
            ft.finetune(tiny_data, out, **dict(args, **change))
        with pytest.raises(UsageError, match=message):  # the same check, whichever way the run is configured
            ft.finetune(tiny_data, out, ft.FinetuneConfig(**dict(args, **change)))
    with pytest.raises(TypeError, match=r"\['epoch'\]"):
        ft.finetune(tiny_data, out, epoch=3)
    with pytest.raises(DataError, match="nowhere"):
        ft.finetune(tiny_data, out, eval_data=tmp_path / "nowhere", eval_every=1, **args)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        ft.finetune(tiny_data, tmp_path / "file", **args)
    assert not out.exists()


@pytest.mark.slow
def test_diverging_training_is_a_clear_error(tiny_data, tmp_path):
    from vehiclenet.training import finetune as ft
    from vehiclenet.errors import TrainingError

    with pytest.raises(TrainingError, match="training diverged; lower --lr"):
        ft.finetune(tiny_data, tmp_path / "out", epochs=2, **dict(TINY, lr=1e30))


def test_truncated_image_during_training_is_a_data_error(tmp_path):
    from vehiclenet.training import finetune as ft
    from vehiclenet.errors import ImageDecodeError

    data = make_dataset(tmp_path / "trunc", n_ids=2, per_id=6, size=64)
    for jpg in (data / "0002").glob("*.jpg"):  # header intact, pixel data cut: passes the header check
        raw = jpg.read_bytes()
        jpg.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ImageDecodeError, match="cannot decode training image") as err:
        ft.finetune(data, tmp_path / "out", epochs=1, batch_size=12, image_size=64, pretrained=False, num_workers=1)
    assert str(data / "0002") in str(err.value) and err.value.path.startswith(str(data / "0002"))
    assert "remove or replace it" in str(err.value) and "RuntimeError" not in str(err.value)


def _grey16_png(path: Path) -> Path:
    """A 16-bit greyscale PNG using the whole 0..65535 range."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = (np.arange(48 * 40, dtype=np.uint32).reshape(48, 40) * 34).astype(np.uint16)
    Image.fromarray(grey).save(path)
    with Image.open(path) as im:
        assert im.mode in ("I", "I;16") and np.asarray(im).max() > 255
    return path


def test_training_decodes_images_as_evaluation_does(tmp_path, monkeypatch):
    """A 16-bit grey PNG gives training exactly the pixels evaluation sees (scaled, not clipped),
    and the whole training pipeline without augmentation gives evaluation's network input."""
    from vehiclenet.training import finetune as ft
    from vehiclenet.errors import ImageDecodeError
    from vehiclenet.embedding.features import _prepare
    from vehiclenet.embedding.preprocessing import load_image

    path = _grey16_png(tmp_path / "0001" / "grey16.png")
    with Image.open(path) as im:
        clipped = np.asarray(im.convert("RGB"))  # what training decoded before: every pixel > 255 became 255
    evaluation = load_image(path)
    assert not np.array_equal(clipped, evaluation)
    training, label = ft._ImageSource([str(path)], np.array([3], np.int32))[0]
    np.testing.assert_array_equal(training, evaluation)
    assert label == 3

    data = ft.TrainingData(str(tmp_path), "folders", [str(path)] * 2, np.array([0, 1], np.int32), ["a", "b"])
    dataset = ft.build_train_dataset(data, batch_size=1, image_size=64, shuffle=False, augment=False, num_workers=1)
    image, _ = next(dataset.create_tuple_iterator(output_numpy=True))
    np.testing.assert_array_equal(image[0], _prepare(str(path), (64, 64)))  # evaluation's input, to the bit

    monkeypatch.setenv("VEHICLENET_MAX_PIXELS", "1000")  # the same guard as evaluation: 40x48 is too large
    source = ft._ImageSource([str(path)], np.array([0], np.int32))
    with pytest.raises(ImageDecodeError, match="cannot decode training image .*VEHICLENET_MAX_PIXELS") as err:
        source[0]
    assert err.value.path == str(path) and source.failure is err.value


def test_lr_schedule_param_groups_and_augmentations():
    from vehiclenet.training import finetune as ft
    from vehiclenet.training.augment import train_transforms
    from vehiclenet.model.network import VehicleNet

    lr = ft.lr_schedule(0.02, steps_per_epoch=10, epochs=40)  # warm-up 5 epochs, decay at 30
    assert lr.shape == (400,)
    assert lr[0] == pytest.approx(0.002) and lr[25] < lr[49] and lr[50] == pytest.approx(0.02)
    assert lr[299] == pytest.approx(0.02) and lr[300] == pytest.approx(0.002)

    groups = ft.param_groups(VehicleNet(num_classes=5), 0.02)
    assert {p.name for p in groups[1]["params"]} == {
        "classifier.dense.weight", "classifier.dense.bias", "classifier.bn1.gamma", "classifier.bn1.beta",
        "classifier.classifier.weight", "classifier.classifier.bias"}
    assert all(p.name.startswith("model.") for p in groups[0]["params"])
    assert groups[0]["lr"] == pytest.approx(0.002) and groups[1]["lr"] == pytest.approx(0.02)
    assert groups[0]["weight_decay"] == groups[1]["weight_decay"] == pytest.approx(1e-4)
    opt = ft.create_optimizer(VehicleNet(num_classes=5), lr)
    assert float(opt.momentum.asnumpy()) == pytest.approx(0.9)

    import mindspore.dataset.transforms as T

    chain = T.Compose(train_transforms(96))
    image = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    out = chain(image)
    out = out[0] if isinstance(out, tuple) else out
    assert out.shape == (3, 96, 96) and out.dtype == np.float32
    assert -3 < out.min() and out.max() < 3  # ImageNet-normalised


def _cli(*args, timeout=300, env=None):
    env = dict(os.environ, GLOG_v="3", **(env or {}))
    return subprocess.run([sys.executable, "-m", "vehiclenet", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.slow
def test_cli_finetune_prints_progress_and_writes_loadable_checkpoints(tiny_data, tmp_path):
    from vehiclenet.model.checkpoint import load_weights
    from vehiclenet.model.network import VehicleNet

    out = tmp_path / "cli"
    split = make_query_gallery(tmp_path / "split")
    run = ("--data", tiny_data, "--epochs", 2, "--batch-size", 6, "--image-size", 64, "--no-pretrained", "--lr", 0.003,
           "--num-workers", 1, "--max-steps-per-epoch", 2, "--seed", 0)
    proc = _cli("finetune", "--out", out, *run, "--eval-data", split, "--eval-every", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("epoch ")]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/2: loss ") and "images/s" in lines[1]
    assert all(", mAP " in ln and ", rank-1 " in ln for ln in lines)
    # The checkpoint written after an evaluation still loads by the network's own names.
    assert proc.stdout.splitlines()[-1] == str(out / "vehiclenet-e002.ckpt")
    report = load_weights(VehicleNet(num_classes=3), out / "vehiclenet-e002.ckpt")
    assert not report.reinitialized and len(report.loaded) == len(list(VehicleNet(num_classes=3).get_parameters()))

    # --json: the run as one JSON object, and nothing else on stdout. Another run with the same
    # settings (evaluation aside) loads the training graph the first one compiled.
    proc = _cli("finetune", "--out", tmp_path / "json", *run, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compile cache hit" in proc.stderr, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["identities"] == 3
    assert result["checkpoints"] == [str(tmp_path / "json" / f"vehiclenet-e00{e}.ckpt") for e in (1, 2)]
    assert [e["epoch"] for e in result["epochs"]] == [1, 2] and result["epochs"][0]["loss"] > 0


@pytest.mark.slow
def test_a_resumed_run_loads_the_compiled_training_graph_and_trains_as_a_compiled_one(tiny_data, tmp_path):
    """The first step's graph is kept in the compile cache: resuming with the same settings loads
    it instead of compiling, and writes the checkpoint an uncached resume writes, bit for bit
    (from weights other than those the graph was filed with: no values come from the file)."""
    import shutil

    from vehiclenet.model.checkpoint import read_checkpoint

    args = ("--data", tiny_data, "--epochs", 2, "--batch-size", 6, "--image-size", 32, "--no-pretrained",
            "--num-workers", 1, "--max-steps-per-epoch", 1, "--seed", 5)
    first = _cli("finetune", "--out", tmp_path / "first", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "compile cache filled" in first.stderr
    logs = {}
    for run, cache in (("cached", "1"), ("uncached", "0")):
        shutil.copytree(tmp_path / "first", tmp_path / run)
        (tmp_path / run / "vehiclenet-e002.ckpt").unlink()
        proc = _cli("finetune", "--out", tmp_path / run, "--resume", tmp_path / run / "vehiclenet-e001.ckpt", *args,
                    env={"VEHICLENET_COMPILE_CACHE": cache})
        assert proc.returncode == 0, proc.stderr[-3000:]
        logs[run] = proc.stderr
    assert "compile cache hit" in logs["cached"] and "compile cache" not in logs["uncached"], logs["cached"][-2000:]
    compiled = Path(os.environ["VEHICLENET_HOME"]) / "compiled"
    assert sorted(p.name for p in compiled.iterdir() if not p.is_dir()) == [".record-key"]
    assert len([p for p in compiled.iterdir() if p.is_dir()]) == 1  # one graph, one entry
    cached, uncached = (read_checkpoint(tmp_path / run / "vehiclenet-e002.ckpt", keep_training_state=True)
                        for run in ("cached", "uncached"))
    assert cached.keys() == uncached.keys() and len(cached) > 600
    for name in cached:
        if name != "__training_state__":
            np.testing.assert_array_equal(cached[name].asnumpy(), uncached[name].asnumpy(), err_msg=name)


def test_the_training_graph_key_names_every_setting_the_graph_holds(tmp_path, small_ckpt, monkeypatch):
    """MindSpore's own cache checks neither shapes nor constants: the entry's key must change
    with everything baked into the training graph, and only with that; what it cannot
    describe turns the cache off (no key)."""
    import importlib

    import mindspore as ms
    import mindspore.nn as nn

    from vehiclenet import create_network
    from vehiclenet.model.graph_key import graph_key
    from vehiclenet.training import finetune as ft

    def fresh(seed=0, **how):
        # Dropout's seeds are constants of the graph, drawn from the global seed as each network
        # is built: the same seed, the same graph.
        ms.set_seed(seed)
        return create_network(mode="pynative", **how)

    batch = (ms.Tensor(np.zeros((2, 3, 32, 32), np.float32)), ms.Tensor(np.zeros(2, np.int32)))
    net = fresh(pretrained=False, num_classes=3)

    def key(network=net, weight_decay=1e-4, steps=4, after=lambda step: None):
        optimizer = ft.create_optimizer(network, ft.lr_schedule(0.01, steps, 2), weight_decay=weight_decay)
        step = ft.build_train_step(network, optimizer)
        after(step)
        return graph_key(step, batch)

    def replaced(obj, name, value):
        """The key with ``obj.name`` set to ``value``; then the old one put back."""
        old = getattr(obj, name)
        setattr(obj, name, value)
        try:
            return key()
        finally:
            setattr(obj, name, old)

    base = key()
    assert base is not None and key() == base  # a new optimizer and step, the same settings: one entry
    # Where the weights came from is not in the graph: a run started from a checkpoint and its
    # resume (a network built without one) share the entry.
    assert key(fresh(checkpoint=small_ckpt, num_classes=3)) == base
    assert key(fresh(pretrained=False, num_classes=4)) != base
    assert key(fresh(seed=1, pretrained=False, num_classes=3)) != base  # other dropout seeds
    assert key(weight_decay=5e-4) != base  # a constant of the optimizer's graph
    assert key(steps=5) != base  # the schedule's length
    assert key(after=lambda step: net.set_train(False)) != base  # BatchNorm on running statistics
    assert key(after=lambda step: step.set_jit_config(ms.JitConfig(jit_level="O1"))) != base
    dynamic = (ms.Tensor(shape=[None, 3, 32, 32], dtype=ms.float32), ms.Tensor(shape=[None], dtype=ms.int32))
    assert key(after=lambda step: step.set_inputs(*dynamic)) != base
    assert key(after=lambda step: net.classifier.add_flags(a_flag=True)) != base
    assert key(after=lambda step: net.classifier.register_buffer("offset", ms.Tensor(np.ones(2, np.float32)))) != base
    del net.classifier._buffers["offset"], net.classifier._func_graph_flags["a_flag"], net.classifier.a_flag
    assert replaced(net.classifier, "dropout", nn.Dropout(p=0.3)) != base
    assert replaced(net.classifier, "dropout", nn.Identity()) != base
    weight = net.classifier.classifier.weight
    # Frozen after the optimizer was made (its parameter list unchanged): only the flag tells.
    assert key(after=lambda step: setattr(weight, "requires_grad", False)) != base
    weight.requires_grad = True
    monkeypatch.setenv("MS_DEV_A_SETTING", "1")
    assert key() != base
    monkeypatch.delenv("MS_DEV_A_SETTING")
    ms.set_auto_parallel_context(parallel_mode="data_parallel", gradients_mean=True)
    try:
        assert key() not in (None, base)
        ms.set_auto_parallel_context(parallel_mode="semi_auto_parallel")
        assert key() is None  # sharding strategies: more than the key can name, so no cache
    finally:
        ms.reset_auto_parallel_context()

    # A cell class of the user's own: its source file is in the key; unreadable, no key.
    (tmp_path / "own_head.py").write_text("import mindspore.nn as nn\n\n\nclass Head(nn.Cell):\n"
                                          "    def construct(self, x):\n        return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    head = importlib.import_module("own_head").Head()
    own = replaced(net.classifier, "dropout", head)
    assert own not in (None, base)
    with open(tmp_path / "own_head.py", "a") as f:
        f.write("# edited\n")
    assert replaced(net.classifier, "dropout", head) not in (None, own, base)
    scope = {"nn": nn, "__name__": "a_module_that_is_nowhere"}
    exec("class Head(nn.Cell):\n    def construct(self, x):\n        return x\n", scope)
    assert replaced(net.classifier, "dropout", scope["Head"]()) is None
    net.classifier.settings = {"scale": object()}
    assert key() is None  # an object it cannot describe
    del net.classifier.settings
    assert key() == base  # every change above was undone, and the key saw that


_HOOKED = """
import numpy as np, mindspore as ms
from vehiclenet import create_network
from vehiclenet.model.graph_key import graph_key
net = create_network(pretrained=False, num_classes=3, mode="pynative")
x = (ms.Tensor(np.zeros((2, 3, 32, 32), np.float32)),)
before = graph_key(net, x)
hook = net.classifier.register_forward_hook(lambda cell, args, out: out)
during = graph_key(net, x)
hook.remove()
print(before is not None, during is None, graph_key(net, x) is None)
"""


def test_a_hook_even_removed_means_no_graph_key_in_that_process():
    # A hook leaves the process's hook count raised for good (MindSpore keys its own graphs by
    # it), so this runs in its own process: in the suite's it would unkey every later test's graph.
    proc = subprocess.run([sys.executable, "-c", _HOOKED], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["True", "True", "True"], proc.stdout


@pytest.mark.slow
def test_cli_finetune_bad_input_exit_codes(tiny_data, tmp_path, published_ckpt):
    import mindspore as ms
    import mindspore.nn as nn

    proc = _cli("finetune", "--data", tmp_path / "missing", "--out", tmp_path / "o", "--no-pretrained")
    assert proc.returncode == 1 and "missing" in proc.stderr and "does not exist" in proc.stderr

    # The published layout has optimizer state but no epoch: nothing to resume, use --checkpoint.
    proc = _cli("finetune", "--data", tiny_data, "--out", tmp_path / "o", "--resume", published_ckpt)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert str(published_ckpt) in proc.stderr and "--checkpoint" in proc.stderr

    # A checkpoint of another model that looks like a fine-tuning checkpoint.
    other = tmp_path / "other.ckpt"
    ms.save_checkpoint(nn.Dense(4, 2), str(other), append_dict={"epoch_num": 1, "step_num": 3})
    proc = _cli("finetune", "--data", tiny_data, "--out", tmp_path / "o", "--resume", other)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert str(other) in proc.stderr and "does not fit this VehicleNet network" in proc.stderr

    proc = _cli("finetune", "--data", tiny_data, "--out", tmp_path / "o", "--epochs", 0)
    assert proc.returncode == 2 and "--epochs must be >= 1" in proc.stderr


def test_evaluation_on_query_gallery_split(tmp_path):
    from vehiclenet.training import finetune as ft
    from vehiclenet.model.device import configure
    from vehiclenet.model.network import VehicleNet

    make_query_gallery(tmp_path)
    configure("CPU")
    net = VehicleNet(num_classes=3)
    net.set_train(True)
    names = [p.name for p in net.get_parameters()]
    result = ft.evaluate_query_gallery(net, tmp_path, image_size=64, batch_size=4)
    assert set(result) == {"mAP", "rank1"} and 0.0 <= result["mAP"] <= 1.0
    # Identities differ only by colour: even random convolutional features separate them.
    assert result["mAP"] > 0.5
    assert net.training  # back in training mode for the next epoch
    # Evaluating must not rename the training net's parameters (checkpoints are saved by name).
    assert [p.name for p in net.get_parameters()] == names
