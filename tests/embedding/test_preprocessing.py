"""Pre-processing: numerics against an independent computation, decoding and conversions."""
import io

import numpy as np
import pytest
from PIL import Image

from vehiclenet.errors import DataError
from vehiclenet.embedding.preprocessing import INPUT_SIZE, MEAN, STD, load_image, preprocess, preprocess_image


def _smooth_rgb(h=48, w=64, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 3.0, y * 4.0, (x + y) * 2.0], axis=-1)
    return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


def test_constants_are_the_published_ones():
    assert INPUT_SIZE == (384, 384)
    np.testing.assert_allclose(MEAN, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(STD, [58.395, 57.12, 57.375])


def test_preprocess_matches_mindspore_bicubic_then_manual_normalise():
    import mindspore.dataset.vision as vision
    from mindspore.dataset.vision import Inter

    img = _smooth_rgb()
    resized = vision.Resize([384, 384], interpolation=Inter.BICUBIC)(img)
    assert resized.dtype == np.uint8 and resized.shape == (384, 384, 3)
    expected = ((resized.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)).transpose(2, 0, 1)
    got = preprocess(img)
    assert got.dtype == np.float32 and got.shape == (3, 384, 384)
    np.testing.assert_array_equal(got, expected)


def test_resize_is_mindspores_kernel_not_pillows():
    # Pillow's bicubic differs from MindSpore's; the reference used MindSpore's on a numpy array.
    img = _smooth_rgb()
    pil = np.asarray(Image.fromarray(img).resize((384, 384), Image.BICUBIC)).astype(np.float32)
    pil_norm = ((pil - np.float32(MEAN)) / np.float32(STD)).transpose(2, 0, 1)
    assert np.abs(preprocess(img) - pil_norm).max() > 0.01


def test_other_sizes_and_non_square_inputs():
    out = preprocess(_smooth_rgb(30, 90), size=(128, 96))
    assert out.shape == (3, 128, 96)


def test_jpeg_decode_equals_the_reference_decoder(tmp_path):
    import mindspore.dataset.vision as vision

    path = tmp_path / "car.jpg"
    Image.fromarray(_smooth_rgb(250, 300)).save(path, quality=90)
    reference = vision.Decode()(np.fromfile(path, dtype=np.uint8))
    np.testing.assert_array_equal(load_image(path), reference)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("P", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"),
                                      ("CMYK", "TIFF"), ("1", "PNG"), ("L", "JPEG"), ("RGB", "BMP")])
def test_modes_convert_like_pillow(tmp_path, mode, fmt):
    src = Image.fromarray(_smooth_rgb(20, 30, seed=3))
    if mode == "LA":
        src = Image.merge("LA", (src.convert("L"), Image.fromarray(np.full((20, 30), 77, np.uint8))))
    elif mode == "RGBA":
        src = src.convert("RGBA")
        src.putalpha(Image.fromarray(np.linspace(0, 255, 600).reshape(20, 30).astype(np.uint8)))
    else:
        src = src.convert(mode)
    path = tmp_path / f"img.{fmt.lower()}"
    src.save(path, fmt)
    with Image.open(path) as im:
        assert im.mode == mode
        expected = np.asarray(im.convert("RGB"))
    got = load_image(path)
    assert got.dtype == np.uint8 and got.shape == (20, 30, 3)
    np.testing.assert_array_equal(got, expected)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = (np.arange(12, dtype=np.uint16) * 257 * 20).reshape(3, 4)  # 0, 5140, ... = 20 * k * 257
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    got = load_image(path)
    np.testing.assert_array_equal(got[..., 0], (np.arange(12) * 20).reshape(3, 4))
    np.testing.assert_array_equal(got[..., 0], got[..., 2])


def test_exif_orientation_is_not_applied(tmp_path):
    img = Image.fromarray(_smooth_rgb(40, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif.tobytes())
    with Image.open(path) as im:
        assert im.getexif().get(0x0112) == 6
    assert load_image(path).shape == (40, 80, 3)  # stored pixels, as the reference saw them


def test_array_and_pil_inputs():
    rgb = _smooth_rgb(10, 12)
    np.testing.assert_array_equal(load_image(rgb), rgb)
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)), rgb)
    grey = rgb[..., 0]
    np.testing.assert_array_equal(load_image(grey), np.stack([grey] * 3, axis=-1))
    np.testing.assert_array_equal(load_image(grey[..., None]), np.stack([grey] * 3, axis=-1))
    rgba = np.concatenate([rgb, np.full((10, 12, 1), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(load_image(rgba), rgb)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    np.testing.assert_array_equal(load_image(buf.getvalue()), rgb)
    np.testing.assert_array_equal(preprocess_image(rgb), preprocess(rgb))


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 2), np.uint8),
                                 np.zeros((2, 4, 4, 3, 1), np.uint8)])
def test_unusable_arrays_raise_data_error(bad):
    with pytest.raises(DataError):
        load_image(bad)


def test_bad_files_raise_data_error_naming_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(_smooth_rgb(64, 64)).save(good, quality=95)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for path in (truncated, garbage, text, tmp_path / "missing.jpg", tmp_path):
        with pytest.raises(DataError) as info:
            preprocess_image(path)
        assert str(path) in str(info.value)
