"""The oneDNN CPU kernels: built here, really used, and numerically the network they replace."""
import logging
import os

import numpy as np
import pytest

from vehiclenet import cpu_kernels
from vehiclenet.cpu_kernels import KernelsUnavailable, build_library, convolution_implementation, library_path
from vehiclenet.errors import UsageError
from vehiclenet.model import create_network


@pytest.fixture
def fresh_library_path():
    """library_path() decides once per process; these tests change what it sees."""
    cpu_kernels._library.cache_clear()
    yield
    cpu_kernels._library.cache_clear()


def _randomise_batchnorm(net, seed: int) -> None:
    """Give every BatchNorm non-trivial statistics, so folding them into the convolutions is tested."""
    import mindspore as ms

    rng = np.random.default_rng(seed)
    for name, p in net.parameters_and_names():
        if name.endswith("moving_variance"):
            value = rng.uniform(0.5, 1.5, p.shape)
        elif name.endswith(("moving_mean", "beta")):
            value = rng.normal(0.0, 0.1, p.shape)
        elif name.endswith("gamma"):
            value = rng.uniform(0.5, 1.0, p.shape)
        else:
            continue
        p.set_data(ms.Tensor(value.astype(np.float32)))


def _fast_and_plain(seed: int = 0, **kwargs):
    """Two networks with the same weights: one on the oneDNN kernels, one on MindSpore's."""
    import mindspore as ms

    fast = create_network(pretrained=False, **kwargs)
    plain = create_network(pretrained=False, **kwargs)
    plain.model.use_cpu_kernels(None)
    assert fast.model.nhwc_ops is not None and plain.model.nhwc_ops is None
    _randomise_batchnorm(fast, seed)
    assert not ms.load_param_into_net(plain, {p.name: p for p in fast.get_parameters()})[0]
    return fast, plain


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_create_network_runs_on_the_kernels_here():
    library = library_path()
    assert library is not None, "this x86-64 Linux machine has the onednn wheels and a compiler"
    net = create_network(pretrained=False, include_top=False)
    assert net.model.nhwc_ops is not None
    # Not oneDNN's GEMM fallback (what MindSpore's own Conv2D runs) nor its reference code.
    for shape in [(8, 96, 96, 64, 64, 3, 1), (8, 48, 48, 512, 128, 1, 1), (1, 384, 384, 3, 64, 7, 2)]:
        implementation = convolution_implementation(library, *shape)
        assert "gemm" not in implementation and "ref" not in implementation, (shape, implementation)


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_same_outputs_as_mindspore_convolutions(mode):
    import mindspore as ms

    # Odd, non-square sizes: MindSpore's "same" padding puts the odd pixel after the image.
    x = ms.Tensor(np.random.default_rng(3).standard_normal((2, 3, 75, 50)).astype(np.float32))
    for kwargs in ({"include_top": False}, {"num_classes": 7, "last_stride": 1}):
        fast, plain = _fast_and_plain(mode=mode, **kwargs)
        got, want = fast(x).asnumpy(), plain(x).asnumpy()
        assert got.shape == want.shape
        assert _rel(got, want) <= 1e-5, (kwargs, _rel(got, want))
    ms.set_context(mode=ms.GRAPH_MODE)


def test_full_size_published_layout_features_match(published_ckpt):
    import mindspore as ms

    fast = create_network(checkpoint=published_ckpt, include_top=False)
    plain = create_network(checkpoint=published_ckpt, include_top=False)
    plain.model.use_cpu_kernels(None)
    x = ms.Tensor(np.random.default_rng(4).standard_normal((2, 3, 384, 384)).astype(np.float32))
    got, want = fast(x).asnumpy(), plain(x).asnumpy()
    assert got.shape == (2, 512)
    assert _rel(got, want) <= 1e-5, _rel(got, want)


def test_training_keeps_mindspore_convolutions():
    import mindspore as ms

    fast, plain = _fast_and_plain(seed=5, num_classes=4)
    x = ms.Tensor(np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32))
    fast.model.set_train(True)
    plain.model.set_train(True)
    # Batch statistics, not the running ones the kernels fold in: identical graphs.
    np.testing.assert_array_equal(fast.model(x).asnumpy(), plain.model(x).asnumpy())


def test_switched_off_by_environment(monkeypatch, caplog, fresh_library_path):
    caplog.set_level(logging.INFO, logger="vehiclenet")
    monkeypatch.setenv("VEHICLENET_CPU_KERNELS", "0")
    assert library_path() is None
    assert "VEHICLENET_CPU_KERNELS=0" in caplog.text
    assert cpu_kernels.status() == "MindSpore's Conv2D (VEHICLENET_CPU_KERNELS=0)"
    assert create_network(pretrained=False).model.nhwc_ops is None
    monkeypatch.setenv("VEHICLENET_CPU_KERNELS", "maybe")
    cpu_kernels._library.cache_clear()
    with pytest.raises(UsageError, match="VEHICLENET_CPU_KERNELS='maybe' is not understood"):
        library_path()


def test_failed_build_falls_back_and_leaves_nothing(tmp_path, monkeypatch, caplog, fresh_library_path):
    import mindspore as ms

    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(KernelsUnavailable, match="compiling .*cpu_kernels.cc failed"):
        build_library(tmp_path)
    assert not [p for p in os.listdir(tmp_path) if not p.endswith(".lock")], "a half-built library was left"

    monkeypatch.setattr(cpu_kernels, "default_build_dir", lambda: tmp_path)
    net = create_network(pretrained=False, include_top=False)
    assert "oneDNN CPU kernels unavailable" in caplog.text and "MindSpore's own" in caplog.text
    assert net.model.nhwc_ops is None
    assert net(ms.Tensor(np.zeros((1, 3, 64, 64), np.float32))).shape == (1, 512)


def test_missing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises(KernelsUnavailable, match="no C\\+\\+ compiler .*no-such-c\\+\\+"):
        build_library(tmp_path)


def test_build_is_done_once_and_reused(tmp_path):
    first = build_library(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build_library(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.glob("*.so")] == [first.name]


def test_kernel_rejects_mismatched_shapes():
    import mindspore as ms

    ops = cpu_kernels.make_ops(library_path())
    x = ms.Tensor(np.ones((1, 8, 8, 4), np.float32))
    w = ms.Tensor(np.ones((6, 5, 3, 3), np.float32))  # 5 input channels, x has 4
    scale = ms.Tensor(np.ones(6, np.float32))
    with pytest.raises(RuntimeError, match="VnConvS1Relu"):
        ops["conv", 1, True](x, w, scale, scale).asnumpy()
