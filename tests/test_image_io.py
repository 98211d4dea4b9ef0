"""Robust image reading: every format to RGB uint8, every bad file to ImageReadError naming it."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from sg_train import image_io
from sg_train.image_io import ImageReadError, decode_image, read_image


def _rgb(h=30, w=40, seed=0):
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def _smooth(h=30, w=40):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1).astype(np.uint8)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


def test_decoder_is_opencv_and_truncated_loading_stays_off():
    import datamodules  # noqa: F401  (importing the package must not flip Pillow's global)

    assert image_io.DECODER == "opencv"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_jpeg_reads_as_rgb_uint8(tmp_path):
    a = _smooth()
    p = _write(tmp_path / "a.jpg", _encode(Image.fromarray(a), "JPEG", quality=95))
    img = read_image(p)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8 and img.flags["C_CONTIGUOUS"]
    assert np.abs(img.astype(int) - a).mean() < 3  # RGB order, not BGR


@pytest.mark.parametrize(
    "mode,fmt,kw",
    [
        ("L", "JPEG", {}),
        ("CMYK", "JPEG", {}),
        ("P", "PNG", {}),
        ("P", "PNG", {"transparency": 0}),
        ("RGBA", "PNG", {}),
        ("LA", "PNG", {}),
        ("1", "PNG", {}),
        ("P", "GIF", {}),
        ("RGB", "WEBP", {}),
        ("RGB", "BMP", {}),
        ("RGB", "TIFF", {}),
    ],
)
def test_every_mode_becomes_rgb(tmp_path, mode, fmt, kw):
    im = Image.fromarray(_smooth()).convert(mode)
    p = _write(tmp_path / f"x.{fmt.lower()}", _encode(im, fmt, **kw))
    img = read_image(p)
    assert img.shape == (30, 40, 3) and img.dtype == np.uint8
    ref = np.asarray(Image.open(p).convert("RGBA").convert("RGB"))
    assert np.abs(img.astype(int) - ref).mean() < 3


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    a16 = _smooth()[..., 0].astype(np.uint16) * 257
    p = _write(tmp_path / "x.png", _encode(Image.fromarray(a16), "PNG"))
    img = read_image(p)
    assert img.shape == (30, 40, 3)
    assert np.abs(img[..., 0].astype(int) - (a16 >> 8)).max() <= 1


def test_exif_orientation_applied(tmp_path):
    im = Image.fromarray(_smooth(30, 40))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = _write(tmp_path / "r.jpg", _encode(im, "JPEG", exif=exif, quality=95))
    assert read_image(p).shape == (40, 30, 3)


def test_pillow_fallback_matches_opencv(tmp_path, monkeypatch):
    im = Image.fromarray(_smooth(30, 40))
    exif = im.getexif()
    exif[0x0112] = 6
    data = _encode(im, "JPEG", exif=exif, quality=95)
    a = decode_image(data)
    monkeypatch.setattr(image_io, "_decode_opencv", lambda d: None)
    b = decode_image(data)
    assert a.shape == b.shape == (40, 30, 3)
    assert np.abs(a.astype(int) - b).mean() < 2


def test_missing_file(tmp_path):
    p = str(tmp_path / "nope.jpg")
    with pytest.raises(ImageReadError, match="file not found") as e:
        read_image(p)
    assert e.value.path == p and p in str(e.value)


def test_directory_and_empty_and_garbage(tmp_path):
    with pytest.raises(ImageReadError, match="directory"):
        read_image(tmp_path)
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(_write(tmp_path / "e.jpg", b""))
    garbage = np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    with pytest.raises(ImageReadError, match="not a recognised image format") as e:
        read_image(_write(tmp_path / "g.jpg", garbage))
    assert "g.jpg" in str(e.value)


@pytest.mark.parametrize("cut", [0.5, 0.9, "eoi"])
def test_truncated_jpeg_detected(tmp_path, cut):
    data = _encode(Image.fromarray(_rgb(64, 64)), "JPEG", quality=90)
    data = data[:-2] if cut == "eoi" else data[: int(len(data) * cut)]
    p = _write(tmp_path / "t.jpg", data)
    with pytest.raises(ImageReadError) as e:
        read_image(p)
    assert e.value.path == p


def test_truncated_jpeg_detected_even_if_opencv_returns_an_image(tmp_path, monkeypatch):
    # Some OpenCV builds return a grey-filled image for a truncated JPEG: the missing EOI
    # marker must send it to Pillow, which refuses it.
    data = _encode(Image.fromarray(_rgb(64, 64)), "JPEG", quality=90)[:1500]
    monkeypatch.setattr(image_io, "_decode_opencv", lambda d: np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ImageReadError, match="truncated"):
        decode_image(data, "t.jpg")


def test_progressive_and_png_truncated(tmp_path):
    prog = _encode(Image.fromarray(_rgb(64, 64)), "JPEG", quality=90, progressive=True)
    png = _encode(Image.fromarray(_rgb(64, 64)), "PNG")
    for name, d in (("p.jpg", prog), ("p.png", png)):
        with pytest.raises(ImageReadError):
            read_image(_write(tmp_path / name, d[: len(d) // 2]))


def test_trailing_bytes_after_eoi_are_fine(tmp_path):
    data = _encode(Image.fromarray(_smooth()), "JPEG", quality=95) + b"\x00" * 10 + b"trailer data"
    img = read_image(_write(tmp_path / "tr.jpg", data))
    assert img.shape == (30, 40, 3)


def test_error_pickles():
    e = pickle.loads(pickle.dumps(ImageReadError("/x/y.jpg", "file not found")))
    assert isinstance(e, ImageReadError) and e.path == "/x/y.jpg" and e.reason == "file not found"
