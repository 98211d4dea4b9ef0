"""Pictures of an evaluation, readable without W&B: the example grid of what the model retrieves
(queries with their box, top-k before and after SuperGlobal reranking, each result framed by its
relevance) and the curves of the retrieval metrics over a run's epochs.

Thumbnails are drawn with Pillow, curves with matplotlib (Agg backend, no display needed). An image
that cannot be read is drawn as a grey tile that says so: a picture never stops an evaluation.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sg_train.image_io import ImageReadError, read_image
from sg_train.retrieval.examples import REVISITED_RELEVANCE, QueryExample

__all__ = ["RELEVANCE_COLOURS", "example_grid", "example_strip", "plot_retrieval_history", "query_thumbnail",
           "result_thumbnail"]

#: frame colour of a result by relevance (RGB): green positives (easy / a labelled positive),
#: orange hard positives, grey junk (ignored by the metric), red negatives
RELEVANCE_COLOURS: dict[str, tuple[int, int, int]] = {
    "easy": (46, 160, 67), "positive": (46, 160, 67), "hard": (245, 143, 10),
    "junk": (140, 140, 140), "negative": (214, 39, 40),
}
_BOX_COLOUR = (30, 120, 255)
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_FRAME = 5  # frame width in pixels
_LABEL_HEIGHT = 14


def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _fit(image: Image.Image, size: int) -> Image.Image:
    """``image`` shrunk to fit a ``size`` x ``size`` square (aspect kept), centred on white."""
    image = image.copy()
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    tile = Image.new("RGB", (size, size), _BACKGROUND)
    tile.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
    return tile


def _unreadable(size: int, path: str | os.PathLike, reason: str) -> Image.Image:
    tile = Image.new("RGB", (size, size), (200, 200, 200))
    draw = ImageDraw.Draw(tile)
    draw.line([(0, 0), (size, size)], fill=(120, 120, 120), width=2)
    draw.line([(0, size), (size, 0)], fill=(120, 120, 120), width=2)
    draw.text((4, 4), "unreadable", fill=_TEXT, font=_font())
    draw.text((4, 18), Path(path).name[: max(4, size // 7)], fill=_TEXT, font=_font())
    return tile


def _read(path: str | os.PathLike) -> tuple[Image.Image | None, str]:
    try:
        return Image.fromarray(read_image(path)), ""
    except ImageReadError as exc:
        return None, exc.reason


def query_thumbnail(path: str | os.PathLike, box: Sequence[int] | None = None, size: int = 128) -> Image.Image:
    """The query image ``path`` shrunk into a ``size`` x ``size`` RGB tile, its ``box``
    ([x1, y1, x2, y2] in source pixels, x2/y2 exclusive) outlined in blue. An unreadable file
    gives a grey tile that says so."""
    image, reason = _read(path)
    if image is None:
        return _unreadable(size, path, reason)
    if box is not None:
        scale = min(size / image.width, size / image.height, 1.0)
        tile = _fit(image, size)
        ox, oy = (size - round(image.width * scale)) // 2, (size - round(image.height * scale)) // 2
        x1, y1, x2, y2 = (float(v) for v in box)
        ImageDraw.Draw(tile).rectangle([ox + x1 * scale, oy + y1 * scale, ox + x2 * scale - 1, oy + y2 * scale - 1],
                                       outline=_BOX_COLOUR, width=2)
        return tile
    return _fit(image, size)


def result_thumbnail(path: str | os.PathLike, relevance: str, size: int = 128, label: str = "") -> Image.Image:
    """The result image ``path`` in a ``size`` x ``size`` tile framed in the colour of its
    ``relevance`` (:data:`RELEVANCE_COLOURS`), with ``label`` (e.g. its rank) in the corner.
    Raises ``KeyError`` for an unknown relevance."""
    colour = RELEVANCE_COLOURS[relevance]
    image, reason = _read(path)
    inner = size - 2 * _FRAME
    body = _unreadable(inner, path, reason) if image is None else _fit(image, inner)
    tile = Image.new("RGB", (size, size), colour)
    tile.paste(body, (_FRAME, _FRAME))
    if label:
        draw = ImageDraw.Draw(tile)
        width = int(draw.textlength(label, font=_font())) + 6
        draw.rectangle([0, 0, width, _LABEL_HEIGHT], fill=colour)
        draw.text((3, 1), label, fill=(255, 255, 255), font=_font())
    return tile


def example_strip(paths: Sequence[str | os.PathLike], relevance: Sequence[str], size: int = 128) -> Image.Image:
    """The results of one query in a row, best first, framed by relevance and numbered from 1:
    an RGB image ``len(paths) * size`` wide, ``size`` high."""
    strip = Image.new("RGB", (max(1, len(paths)) * size, size), _BACKGROUND)
    for i, (path, rel) in enumerate(zip(paths, relevance)):
        strip.paste(result_thumbnail(path, rel, size, label=str(i + 1)), (i * size, 0))
    return strip


def _ap_text(ap: Mapping[str, float]) -> str:
    return "AP " + " ".join(f"{name} {'n/a' if value != value else f'{100 * value:.1f}'}" for name, value in ap.items())


def example_grid(examples: Sequence[QueryExample], query_paths: Sequence[str | os.PathLike],
                 query_boxes: Sequence[Sequence[int] | None], database_paths: Sequence[str | os.PathLike],
                 title: str = "", size: int = 96, legend: Sequence[str] = REVISITED_RELEVANCE) -> Image.Image:
    """One picture of ``examples``: per query a row ``query | top-k`` and, when reranked, a row
    ``AP | top-k after SuperGlobal rerank``; each row is labelled with the query's AP (in %), and
    a legend of the frame colours (``legend``: the relevance names of the benchmark) heads the picture. ``query_paths``/``query_boxes`` are indexed
    by ``QueryExample.query``, ``database_paths`` by its ranks. Returns an RGB image."""
    k = max([len(e.ranks) for e in examples] + [1])
    gap, text_w = 4, 150
    width = text_w + size + gap + k * size
    rows = sum(1 + (e.rerank_ranks is not None) for e in examples)
    header = 2 * _LABEL_HEIGHT + 8
    grid = Image.new("RGB", (width, header + rows * (size + gap)), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    draw.text((4, 2), title, fill=_TEXT, font=_font())
    x = 4
    for name in legend:
        draw.rectangle([x, _LABEL_HEIGHT + 4, x + 10, _LABEL_HEIGHT + 14], fill=RELEVANCE_COLOURS[name])
        draw.text((x + 14, _LABEL_HEIGHT + 3), name, fill=_TEXT, font=_font())
        x += 24 + int(draw.textlength(name, font=_font()))
    y = header
    for example in examples:
        runs = [("global", example.ranks, example.relevance, example.ap)]
        if example.rerank_ranks is not None:
            runs.append(("reranked", example.rerank_ranks, example.rerank_relevance, example.rerank_ap))
        for i, (label, ranks, relevance, ap) in enumerate(runs):
            draw.text((4, y + 4), f"query {example.query}" if i == 0 else "", fill=_TEXT, font=_font())
            draw.text((4, y + 20), label, fill=_TEXT, font=_font())
            draw.text((4, y + 36), _ap_text(ap), fill=_TEXT, font=_font())
            if i == 0:
                grid.paste(query_thumbnail(query_paths[example.query], query_boxes[example.query], size), (text_w, y))
            grid.paste(example_strip([database_paths[r] for r in ranks], relevance, size), (text_w + size + gap, y))
            y += size + gap
    return grid


def plot_retrieval_history(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write a PNG of every retrieval metric over the epochs of ``history`` (the evaluations of
    ``results.json``: each with ``epoch`` and ``per_dataset``): one panel per dataset, E/M/H mAP
    (or a labelled set's metrics) as solid lines, after SuperGlobal reranking dashed, in %.
    Evaluations before training are drawn at epoch -1. Returns ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    datasets = list(dict.fromkeys(name for entry in history for name in entry["per_dataset"]))
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(5 * max(1, len(datasets)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        series: dict[tuple[str, bool], list[tuple[int, float]]] = {}
        for entry in history:
            result = entry["per_dataset"].get(name)
            if result is None:
                continue
            epoch = -1 if entry["stage"] == "before_training" else int(entry["epoch"])
            for key, reranked in (("mAP", False), ("rerank_mAP", True), ("metrics", False), ("rerank_metrics", True)):
                for metric, value in result.get(key, {}).items():
                    if metric != "num_queries_scored" and value is not None:
                        series.setdefault((metric, reranked), []).append((epoch, 100 * float(value)))
        colours = {}
        for (metric, reranked), points in series.items():
            points.sort()
            colour = colours.setdefault(metric, f"C{len(colours)}")
            xs, ys = zip(*points)
            ax.plot(xs, ys, linestyle="--" if reranked else "-", marker="o", markersize=3, color=colour,
                    label=f"{metric} + rerank" if reranked else metric)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(name)
        ax.set_xlabel("epoch (-1: before training)")
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
