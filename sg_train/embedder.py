"""Descriptors of any images with a trained model, prepared exactly as retrieval evaluation does.

``load_model(ckpt)`` gives an :class:`Embedder`; ``Embedder.embed(images)`` gives one L2-normalised
float32 row per image. The pixels the model sees are the ones the retrieval evaluation feeds it for
a **database image** of a Revisited benchmark under the same evaluation protocol
(:mod:`sg_train.eval_protocols`): the whole image (no crop), decoded to 8-bit RGB
(:func:`sg_train.image_io.read_image`: OpenCV, EXIF orientation applied), ``(pixels / 255 - mean)
/ std`` in the model's channel order (the model's own ``input_format``/``mean``/``std``, applied
with albumentations' ``Normalize`` exactly as ``datamodules.transforms.build_eval_transform``
does), then the protocol's scales, each resized by the protocol's rule, through
:func:`sg_train.extraction.extract_descriptors`. ``tests/test_embedder.py`` checks the result
against ``RevisitedDataset`` + ``extract_descriptors``.

The normalisation is not imported from ``datamodules.transforms``: ``datamodules/`` is an
application folder of the checkout, not part of the installed package, and ``sg_train`` never
imports it (docs/design.md §1).

Images are decoded a window of ``4 × batch_size`` at a time (files in threads, the next window
while the model runs on the current one): whatever the number of images, memory holds two windows of
uint8 pixels, about what two float32 batches weigh. Inside a window, images of equal size are
batched together (:func:`sg_train.extraction.plan_batches`); a batched descriptor equals the
one-by-one descriptor up to float summation order (about 1e-7 here).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any, Union

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations checks PyPI at import otherwise

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from sg_train.descriptor_cache import model_fingerprint  # noqa: E402
from sg_train.errors import UserInputError  # noqa: E402
from sg_train.eval_protocols import EvalProtocol, ProtocolError, resolve_protocol  # noqa: E402
from sg_train.extraction import bind_protocol, extract_descriptors  # noqa: E402
from sg_train.image_io import ImageReadError, _pil_to_rgb, read_image  # noqa: E402
from sg_train.inference import model_from_checkpoint  # noqa: E402
from sg_train.progress import progress_bar  # noqa: E402
from sg_train.weights_io import stored_class_names  # noqa: E402

__all__ = ["DECODE_WINDOW_BATCHES", "Embedder", "ImageInput", "load_model"]

#: One image: a file path, a PIL image, or an (H, W, 3) uint8 RGB array ((H, W, 4) RGBA: alpha dropped).
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

#: Images decoded ahead, in batches: uint8 pixels of 4 batches weigh what one float32 batch does.
DECODE_WINDOW_BATCHES = 4
_DECODE_THREADS = min(8, os.cpu_count() or 1)


class _DecodedImages(Dataset):
    """Decoded RGB uint8 images, normalised for the model on access: the dataset protocol of
    :func:`sg_train.extraction.extract_descriptors` (``(image (3, H, W) float32, i)``, ``image_sizes``)."""

    def __init__(self, images: list[np.ndarray], normalise: Callable[[np.ndarray], Tensor]) -> None:
        self.images = images
        self.normalise = normalise

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.normalise(self.images[i]), int(i)

    def image_sizes(self) -> list[tuple[int, int]]:
        return [(int(im.shape[0]), int(im.shape[1])) for im in self.images]


def _normaliser(input_format: str, mean: Sequence[float], std: Sequence[float]) -> Callable[[np.ndarray], Tensor]:
    """RGB uint8 (H, W, 3) -> float32 (3, H, W): channels in ``input_format`` order, then
    ``(pixels / 255 - mean) / std`` (the same albumentations ops as the evaluation datasets)."""
    pipeline = A.Compose([A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()])
    bgr = str(input_format).lower() == "bgr"

    def normalise(rgb: np.ndarray) -> Tensor:
        pixels = np.ascontiguousarray(rgb[..., ::-1]) if bgr else rgb
        return pipeline(image=pixels)["image"]

    return normalise


def _array_problems(array: np.ndarray) -> list[str]:
    """What keeps ``array`` from being an image, each with the conversion that fixes it (empty: none)."""
    shape = array.shape
    problems = []
    if array.ndim == 2:
        problems.append("it is greyscale: make it RGB with np.stack([x] * 3, -1)")
    elif array.ndim == 3 and shape[2] == 1:
        problems.append("it has one channel: make it RGB with np.repeat(x, 3, -1)")
    elif array.ndim == 3 and shape[0] in (3, 4) and shape[2] not in (3, 4):
        problems.append("it is channels first (C, H, W): put the channels last with x.transpose(1, 2, 0)")
    elif array.ndim != 3 or shape[2] not in (3, 4):
        problems.append("an array must be (H, W, 3) RGB or (H, W, 4) RGBA")
    elif shape[0] < 1 or shape[1] < 1:
        problems.append("it has no pixels")
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            how = "(x * 255).round().astype(np.uint8) if its values are 0..1, x.round().astype(np.uint8) if 0..255"
        elif array.dtype == np.uint16:
            how = "(x >> 8).astype(np.uint8), as a 16-bit image file is read"
        else:
            how = "x.astype(np.uint8) if its values are 0..255"
        problems.append(f"pixels must be uint8 0..255: convert with {how}")
    return problems


def _check_item(item: Any, i: int) -> Any:
    """``item`` as decoding takes it (an (H, W, 4) array without its alpha channel) if it is a supported
    image input; TypeError / UserInputError naming item ``i`` otherwise."""
    if isinstance(item, (str, os.PathLike, Image.Image)):
        return item
    if isinstance(item, np.ndarray):
        problems = _array_problems(item)
        if problems:
            raise UserInputError(f"image {i} is a numpy array of shape {item.shape} and dtype {item.dtype}; "
                                 + "; ".join(problems))
        return item[..., :3]  # alpha dropped, as read_image drops a file's
    raise TypeError(f"image {i} is a {type(item).__name__}; give a file path (str or Path), a PIL image or an "
                    "(H, W, 3) RGB / (H, W, 4) RGBA uint8 numpy array")


def _as_items(images: ImageInput | Sequence[ImageInput]) -> list[Any]:
    """One image or a sequence of them (a 4-D array is a sequence of (H, W, 3|4) arrays), checked."""
    single = isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray)
                                                                     and images.ndim != 4)
    items = [images] if single else list(images)
    return [_check_item(item, i) for i, item in enumerate(items)]


def _from_pil(image: Image.Image, i: int) -> np.ndarray:
    """A PIL image as RGB uint8, EXIF orientation applied (as :func:`read_image` does for its file)."""
    name = getattr(image, "filename", "") or f"<PIL image {i}>"
    try:
        return _pil_to_rgb(ImageOps.exif_transpose(image), name)
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # a lazily opened file that turns out to be damaged
        raise ImageReadError(name, f"corrupt image: {e}") from None


class Embedder:
    """A retrieval model that turns images into descriptors under an evaluation protocol.

    Args:
        model: an :class:`~sg_train.model.EmbeddingModel` (e.g. from
            :func:`sg_train.inference.model_from_checkpoint`); it is put in eval mode on ``device``.
        protocol: the evaluation protocol (name or :class:`~sg_train.eval_protocols.EvalProtocol`)
            whose scales and per-scale resize are used; "revisitop" (default) is what the training
            callback and ``evaluate.py --checkpoint`` measure.
        scales: extraction scales replacing the protocol's (the protocol then becomes its "custom"
            variant, as in ``evaluate.py --scales``); None: the protocol's.
        device: where the model runs ("cpu", "cuda", "cuda:1", ...).
        class_names: the class names of the training data, if known.
        checkpoint: the file the model came from, if any (recorded by ``python -m sg_train.embed``).

    Raises :class:`~sg_train.eval_protocols.ProtocolError` for an unknown protocol, bad scales, a
    protocol whose colours the model contradicts (e.g. "superglobal" with mean = std = 0.5), or one
    that caps the image size (``max_size``: the embedder feeds whole images).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        protocol: str | EvalProtocol = "revisitop",
        scales: Sequence[float] | None = None,
        device: torch.device | str = "cpu",
        class_names: Sequence[str] | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        resolved = resolve_protocol(protocol, scales=scales)
        if resolved.max_size is not None:
            raise ProtocolError(f"protocol {resolved.name!r} shrinks images to a longest side of "
                                f"{resolved.max_size} px (max_size); the embedder feeds whole images: use a "
                                "protocol without max_size ('revisitop' or 'superglobal')")
        self._device = torch.device(device)
        self._model = model.to(self._device).eval()
        self._bound = bind_protocol(self._model, resolved)  # checks the protocol's colours against the model's
        self._normalise = _normaliser(self._model.input_format, self._model.mean, self._model.std)
        self._class_names = None if class_names is None else [str(n) for n in class_names]
        self._checkpoint = None if checkpoint is None else Path(checkpoint)

    # -- what it is -------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The embedding model (eval mode, on :attr:`device`)."""
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def protocol(self) -> EvalProtocol:
        """The evaluation protocol in effect (scales, resize rule, colours)."""
        return self._bound.protocol

    @property
    def scales(self) -> tuple[float, ...]:
        """Extraction scales (the protocol's)."""
        return self._bound.scales

    @property
    def embedding_dim(self) -> int:
        """D, the number of columns :meth:`embed` returns."""
        return int(self._model.embedding_dim)

    @property
    def preprocessing(self) -> dict[str, object]:
        """The model's pixel normalisation: ``(pixels · scale - mean) / std`` in ``input_format`` order."""
        return dict(self._model.preprocessing)

    @property
    def class_names(self) -> list[str] | None:
        """The training classes' names, in class order, as the checkpoint stores them; None when it stores none."""
        return None if self._class_names is None else list(self._class_names)

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint the model was loaded from (None when built from a model)."""
        return self._checkpoint

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 of the model's weights, structure, preprocessing and protocol
        (:func:`sg_train.descriptor_cache.model_fingerprint` of the protocol-bound model): equal
        fingerprints give equal descriptors."""
        return model_fingerprint(self._bound)

    # -- descriptors ------------------------------------------------------------------------
    def embed(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32,
              progress: bool = False) -> np.ndarray:
        """Descriptors of ``images``: float32 ``(N, D)``, row i = image i, each row L2-normalised.

        ``images``: one image or a sequence of any mix of file paths (str / ``os.PathLike``), PIL
        images (EXIF orientation applied, as for a file) and ``(H, W, 3)`` uint8 RGB numpy arrays;
        a 4-D ``(N, H, W, 3)`` array is N images. An ``(H, W, 4)`` RGBA array is embedded without
        its alpha channel (not blended), as an image file or PIL image with alpha is
        (:func:`sg_train.image_io.read_image`). ``batch_size``: images per forward pass (at most;
        only equal-size images share a batch). ``progress``: a progress bar.

        Raises :class:`~sg_train.image_io.ImageReadError` naming the first image that cannot be read
        (a missing, corrupt or truncated file, or a damaged lazily-opened PIL image), ``TypeError``
        for an unsupported input and :class:`~sg_train.errors.UserInputError` for an array of
        another shape or dtype (its message gives the conversion: greyscale, channels first,
        float or 16-bit pixels); both before any image is decoded.
        """
        items = _as_items(images)
        rows, descriptors, _ = self._run(items, batch_size, progress, skip_unreadable=False)
        out = np.empty((len(items), self.embedding_dim), dtype=np.float32)
        out[rows] = descriptors
        return out

    def embed_readable(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 32, progress: bool = False
                       ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ImageReadError]]]:
        """:meth:`embed`, leaving out the images that cannot be read instead of raising.

        Returns ``(rows, descriptors, unreadable)``: ``rows`` int64 ``(n,)`` ascending, the input
        positions that were embedded; ``descriptors`` float32 ``(n, D)``, row j = image ``rows[j]``;
        ``unreadable`` ``[(position, ImageReadError)]`` in input order. ``n + len(unreadable) = N``.
        """
        items = _as_items(images)
        rows, descriptors, unreadable = self._run(items, batch_size, progress, skip_unreadable=True)
        order = np.argsort(rows, kind="stable")
        return rows[order], descriptors[order], sorted(unreadable, key=lambda pair: pair[0])

    def _run(self, items: list[Any], batch_size: int, progress: bool, *, skip_unreadable: bool
             ) -> tuple[np.ndarray, np.ndarray, list[tuple[int, ImageReadError]]]:
        """Decode window by window (the next one in threads while the model runs) and extract."""
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or int(batch_size) < 1:
            raise UserInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = int(batch_size)
        step = DECODE_WINDOW_BATCHES * batch_size
        windows = [range(start, min(len(items), start + step)) for start in range(0, len(items), step)]
        rows: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
        descriptors: list[np.ndarray] = [np.zeros((0, self.embedding_dim), dtype=np.float32)]
        unreadable: list[tuple[int, ImageReadError]] = []
        pool = ThreadPoolExecutor(max_workers=_DECODE_THREADS, thread_name_prefix="sg-train-decode")

        def decode(window: range) -> list[Future | np.ndarray | ImageReadError]:
            # Files in threads (OpenCV releases the GIL); PIL images and arrays here, once each.
            out: list[Future | np.ndarray | ImageReadError] = []
            for i in window:
                item = items[i]
                if isinstance(item, (str, os.PathLike)):
                    out.append(pool.submit(read_image, item))
                elif isinstance(item, Image.Image):
                    try:
                        out.append(_from_pil(item, i))
                    except ImageReadError as err:
                        out.append(err)
                else:
                    out.append(np.ascontiguousarray(item))
            return out

        bar = progress_bar(total=len(items), desc="embed", unit="img", enabled=progress)
        try:
            pending = decode(windows[0]) if windows else []
            for w, window in enumerate(windows):
                current, pending = pending, (decode(windows[w + 1]) if w + 1 < len(windows) else [])
                decoded: list[np.ndarray] = []
                positions: list[int] = []
                for i, value in zip(window, current):
                    try:
                        if isinstance(value, ImageReadError):
                            raise value
                        decoded.append(value.result() if isinstance(value, Future) else value)
                        positions.append(i)
                    except ImageReadError as err:
                        if not skip_unreadable:
                            raise
                        unreadable.append((i, err))
                if decoded:
                    idx, desc = extract_descriptors(self._bound, _DecodedImages(decoded, self._normalise),
                                                    batch_size=batch_size, device=self._device, progress=False)
                    rows.append(np.asarray(positions, dtype=np.int64)[idx.numpy()])
                    descriptors.append(desc.numpy())
                bar.update(len(window))
        finally:
            bar.close()
            pool.shutdown(wait=True, cancel_futures=True)
        return np.concatenate(rows), np.concatenate(descriptors), unreadable

    def __repr__(self) -> str:
        source = f"checkpoint={str(self._checkpoint)!r}, " if self._checkpoint is not None else ""
        return (f"Embedder({source}backbone={getattr(self._model, 'backbone_name', type(self._model).__name__)!r}, "
                f"embedding_dim={self.embedding_dim}, protocol={self.protocol.summary()!r}, device='{self._device}')")


def _stored_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names an sg-train checkpoint's record stores
    (:func:`sg_train.weights_io.stored_class_names`), or None when it stores none.

    :func:`model_from_checkpoint` has just read and checked the whole file; here it is memory-mapped
    (the tensors are not read again).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except RuntimeError:  # a file of the legacy (non-zip) torch.save format cannot be mapped
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    return stored_class_names(checkpoint)


def load_model(
    path: str | os.PathLike,
    *,
    protocol: str | EvalProtocol = "revisitop",
    scales: Sequence[float] | None = None,
    device: torch.device | str = "cpu",
) -> Embedder:
    """The :class:`Embedder` of an sg-train checkpoint (a Lightning ``.ckpt`` written by ``train.py``).

    The model is rebuilt from the configuration the checkpoint stores (trained head, scales,
    preprocessing; :func:`sg_train.inference.model_from_checkpoint`), and embeds under
    ``protocol`` (default "revisitop", what ``evaluate.py --checkpoint`` and the training callback
    use) with the protocol's scales, or ``scales`` when given. Class names come from the
    checkpoint's record (``checkpoint["sg_train"]["class_names"]``) when it stores them, else None.

    Example::

        embedder = sg_train.load_model("runs/demo/checkpoints/last.ckpt")
        X = embedder.embed(["a.jpg", "b.jpg"])      # (2, D) float32, rows L2-normalised
        similarity = X @ X.T                        # cosine similarities in [-1, 1]

    Raises FileNotFoundError, :class:`~sg_train.weights_io.WeightsFileError` (unreadable file, not
    an sg-train checkpoint), :class:`~sg_train.weights_io.WeightsMismatchError` (weights that do
    not fit) and :class:`~sg_train.eval_protocols.ProtocolError` (see :class:`Embedder`). Lightning
    checkpoints are pickles: load only checkpoints you trust.
    """
    model = model_from_checkpoint(path)
    return Embedder(model, protocol=protocol, scales=scales, device=device,
                    class_names=_stored_class_names(path), checkpoint=path)
