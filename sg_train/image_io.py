"""Read an image file into an RGB ``uint8`` array, or fail with an error that names the file.

Decoding goes through OpenCV (``cv2.imdecode``, libjpeg-turbo), which decodes JPEGs about
1.6-2x faster than Pillow on this stack; Pillow is the fallback for anything OpenCV will not
decode, and the judge of JPEGs that do not end with an end-of-image marker (trailing bytes
are legal, a truncated file is not). Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` is
never touched: truncated files raise.

Every failure (missing file, permission, empty, not an image, corrupt, truncated, too large)
raises :class:`ImageReadError` carrying ``path`` and a short ``reason``.
"""

from __future__ import annotations

import io
import os
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps

from sg_train.errors import UserInputError

__all__ = ["DECODER", "IMAGE_EXTENSIONS", "ImageReadError", "decode_image", "read_image"]

#: File extensions (lower case) of the formats Pillow opens: what a folder of images is made of
#: (other files are skipped and counted by the folder readers).
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)

#: The primary decoder (Pillow is only a fallback).
DECODER = "opencv"

_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"


class ImageReadError(UserInputError):
    """An image file that cannot be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")

    def __reduce__(self):  # picklable across DataLoader workers
        return (type(self), (self.path, self.reason))


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read ``path`` into an ``(H, W, 3)`` RGB ``uint8`` array (EXIF orientation applied).

    Greyscale, palette, CMYK, 16-bit and alpha images are converted to RGB (alpha dropped).
    Raises :class:`ImageReadError` for a missing, unreadable, corrupt or truncated file.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory") from None
    except PermissionError:
        raise ImageReadError(path, "permission denied") from None
    except OSError as e:
        raise ImageReadError(path, f"{type(e).__name__}: {e.strerror or e}") from None
    return decode_image(data, path)


def decode_image(data: bytes, path: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Decode encoded image bytes to an ``(H, W, 3)`` RGB ``uint8`` array; ``path`` is for errors."""
    if len(data) == 0:
        raise ImageReadError(path, "empty file")
    img = _decode_opencv(data)
    if img is not None and data[:2] == _JPEG_SOI and not _ends_with_eoi(data):
        # OpenCV builds differ on truncated JPEGs (some return a grey-filled image).
        # Trailing bytes after the EOI marker are legal, so let Pillow decide.
        img = None
    if img is None:
        img = _decode_pillow(data, path)
    return img


def _ends_with_eoi(data: bytes) -> bool:
    return data[-64:].rstrip(b"\x00\r\n\t ").endswith(_JPEG_EOI)


def _decode_opencv(data: bytes) -> np.ndarray | None:
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        if _IMREAD_RGB is not None:
            img = cv2.imdecode(buf, _IMREAD_RGB)
        else:  # pragma: no cover - older OpenCV
            img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
            if img is not None:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    except cv2.error:
        return None
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or img.size == 0:
        return None
    return img


def _decode_pillow(data: bytes, path: str | os.PathLike) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # raises on truncated data (LOAD_TRUNCATED_IMAGES stays False)
                im = ImageOps.exif_transpose(im)
                return _pil_to_rgb(im, path)
    except ImageReadError:
        raise
    except Image.UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg:
            msg = f"truncated file ({msg})"
        raise ImageReadError(path, f"corrupt image: {msg}") from None
    except Exception as e:  # any other decoder failure is still this file's fault
        raise ImageReadError(path, f"corrupt image: {type(e).__name__}: {e}") from None


def _pil_to_rgb(im: Image.Image, path: str | os.PathLike) -> np.ndarray:
    mode = im.mode
    if mode == "RGB":
        arr = np.asarray(im)
    elif mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode.startswith("I;16"):
            a = a.astype(np.uint16) >> 8
        a = np.clip(a, 0, 255).astype(np.uint8)
        arr = np.repeat(a[..., None], 3, axis=2)
    elif mode in ("P", "PA", "LA", "RGBA", "La", "RGBa"):
        arr = np.asarray(im.convert("RGBA"))[..., :3]
    else:  # L, 1, CMYK, YCbCr, LAB, HSV, ...
        arr = np.asarray(im.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ImageReadError(path, f"unsupported image mode {mode}")
    return np.ascontiguousarray(arr, dtype=np.uint8)
