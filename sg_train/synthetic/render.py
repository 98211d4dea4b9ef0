"""Procedural landmark scenes: a landmark's canonical picture and the scene parts around it.

A *landmark* is a :class:`LandmarkSpec` drawn from its own random generator: a main block
with floors of windows, a wall texture, a roof, optional side towers / wings, a central
feature and an emblem, all coloured from shared palettes. Every attribute comes from one
small shared vocabulary (window shapes, textures, roofs, features, emblems, colours), so
landmarks share structure families and differ in how the parts combine: colour or coarse
shape alone do not identify one, its arrangement of parts does.

:func:`render_landmark` draws a spec once, front-on, as an RGBA canvas (alpha = the
landmark's silhouette); :mod:`sg_train.synthetic.views` warps that canvas into each view.
The scene parts (sky and ground, background buildings, trees, people, cars, posts) are
drawn here too, by plain functions on ``uint8`` RGB arrays.

Everything is deterministic given the ``numpy.random.Generator`` handed in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# --------------------------------------------------------------------------------------
# Vocabulary shared by every landmark (RGB colours).
# --------------------------------------------------------------------------------------
WALL_COLOURS = (
    (212, 192, 152),  # sandstone
    (226, 221, 206),  # limestone
    (158, 72, 52),    # brick
    (142, 141, 136),  # grey stone
    (96, 90, 84),     # dark stone
    (238, 236, 230),  # white render
    (204, 154, 76),   # ochre
    (214, 162, 150),  # pink render
    (172, 190, 206),  # pale blue render
    (186, 112, 74),   # terracotta
    (120, 128, 104),  # weathered green-grey
    (228, 204, 120),  # yellow render
)
ROOF_COLOURS = (
    (62, 66, 78),     # slate
    (92, 152, 132),   # copper green
    (178, 88, 52),    # terracotta tiles
    (206, 168, 64),   # gilt
    (42, 42, 48),     # lead / dark
    (120, 122, 130),  # zinc
    (150, 60, 50),    # red tiles
)
WINDOW_COLOURS = (
    (30, 32, 40),     # dark opening
    (70, 98, 138),    # glass
    (48, 60, 58),     # dark green glass
    (214, 186, 104),  # lit / gilt
    (20, 20, 24),     # black
)
WINDOW_SHAPES = ("rect", "arched", "round", "gothic", "double", "slit", "cross", "square")
TEXTURES = ("plain", "bricks", "bands", "ribs", "blocks", "lattice", "checker", "dots")
ROOFS = ("flat", "gable", "dome", "spire", "crenel", "hip", "onion", "stepped", "mansard")
FEATURES = ("none", "door", "rose", "clock", "portico", "gate", "arcade")
TOWER_ROOFS = ("spire", "dome", "crenel", "onion", "hip", "flat", "stepped")
EMBLEMS = ("none", "circle", "diamond", "star", "triangle", "shield", "stripes", "cross")
ACCENT_COLOURS = (
    (176, 36, 40),    # red
    (40, 70, 150),    # blue
    (222, 180, 48),   # gold
    (40, 120, 70),    # green
    (245, 245, 240),  # white
    (28, 28, 32),     # black
    (120, 50, 130),   # purple
)

UNIT = 320            # size unit of a landmark's proportions (px)
CANVAS = 640          # canonical canvas side (px) before cropping to the silhouette
GROUND_Y = 620        # the landmark stands on this row of the canvas
MAX_SIDE = 224        # a cropped canvas larger than this is downsampled (area) to it


def _jitter_colour(rng: np.random.Generator, rgb, amount: float = 12.0) -> tuple:
    c = np.asarray(rgb, np.float64) + rng.normal(0.0, amount, 3)
    return tuple(int(v) for v in np.clip(c, 0, 255))


def _shade(rgb, factor: float) -> tuple:
    return tuple(int(v) for v in np.clip(np.asarray(rgb, np.float64) * factor, 0, 255))


@dataclass
class BlockStyle:
    """One rectangular part of a landmark (main body, tower or wing)."""

    floors: int
    cols: int
    window: str
    window_w: float       # window width as a fraction of its cell
    window_h: float       # window height as a fraction of its floor
    framed: bool
    pilasters: bool
    cornices: bool
    roof: str
    roof_h: float         # roof height as a fraction of the block width


@dataclass
class LandmarkSpec:
    """Everything that identifies one landmark; drawn by :func:`sample_landmark`."""

    width: float          # main block width, fraction of the canvas
    height: float         # main block height, fraction of the canvas
    main: BlockStyle
    texture: str
    texture_period: int
    wall: tuple
    trim: tuple
    roof_colour: tuple
    window_colour: tuple
    feature: str
    towers: int           # 0, 1 (left or right) or 2 (both sides)
    tower_side: int       # -1 left, +1 right (when towers == 1)
    tower_w: float        # fraction of the main width
    tower_h: float        # fraction of the main height (> 1: taller)
    tower: BlockStyle | None
    wings: bool
    wing_h: float
    plinth: float
    asym_shift: float     # horizontal offset of the central feature (fraction of width)
    base: tuple | None = None  # a second wall colour on the lower part (two-tone facade)
    base_frac: float = 0.0     # height of that lower part, fraction of each block
    emblem: str = "none"  # a large sign / coat of arms on the facade
    emblem_colour: tuple = (0, 0, 0)
    emblem_pos: tuple = (0.5, 0.3)  # centre, fractions of the main block (x, y)
    emblem_size: float = 0.15       # fraction of the main block width
    extras: list = field(default_factory=list)


def _sample_block(rng: np.random.Generator, tall: bool) -> BlockStyle:
    floors = int(rng.integers(2, 6) if tall else rng.integers(1, 5))
    cols = int(rng.integers(1, 3) if tall else rng.integers(2, 7))
    return BlockStyle(
        floors=floors,
        cols=cols,
        window=str(rng.choice(WINDOW_SHAPES)),
        window_w=float(rng.uniform(0.4, 0.75)),
        window_h=float(rng.uniform(0.45, 0.8)),
        framed=bool(rng.random() < 0.5),
        pilasters=bool(rng.random() < 0.4),
        cornices=bool(rng.random() < 0.6),
        roof=str(rng.choice(TOWER_ROOFS if tall else ROOFS)),
        roof_h=float(rng.uniform(0.25, 0.7) if not tall else rng.uniform(0.5, 1.6)),
    )


def sample_landmark(rng: np.random.Generator) -> LandmarkSpec:
    """Draw one landmark's identity from the shared vocabulary."""
    main = _sample_block(rng, tall=False)
    towers = int(rng.choice([0, 0, 1, 2, 2]))
    wall = _jitter_colour(rng, WALL_COLOURS[rng.integers(len(WALL_COLOURS))], 20)
    trim_factor = float(rng.choice([0.7, 0.8, 1.15, 1.25]))
    return LandmarkSpec(
        width=float(rng.uniform(0.45, 0.8)),
        height=float(rng.uniform(0.25, 0.55)),
        main=main,
        texture=str(rng.choice(TEXTURES)),
        texture_period=int(rng.integers(10, 23)),
        wall=wall,
        trim=_shade(wall, trim_factor),
        roof_colour=_jitter_colour(rng, ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))], 18),
        window_colour=_jitter_colour(rng, WINDOW_COLOURS[rng.integers(len(WINDOW_COLOURS))], 8),
        feature=str(rng.choice(FEATURES)),
        towers=towers,
        tower_side=int(rng.choice([-1, 1])),
        tower_w=float(rng.uniform(0.14, 0.28)),
        tower_h=float(rng.uniform(1.2, 2.2)),
        tower=_sample_block(rng, tall=True) if towers else None,
        wings=bool(rng.random() < 0.35),
        wing_h=float(rng.uniform(0.4, 0.7)),
        plinth=float(rng.uniform(0.0, 0.12)),
        asym_shift=float(rng.choice([0.0, 0.0, rng.uniform(-0.25, 0.25)])),
        base=_jitter_colour(rng, WALL_COLOURS[rng.integers(len(WALL_COLOURS))], 20)
        if rng.random() < 0.4 else None,
        base_frac=float(rng.uniform(0.25, 0.5)),
        emblem=str(rng.choice(EMBLEMS)),
        emblem_colour=_jitter_colour(rng, ACCENT_COLOURS[rng.integers(len(ACCENT_COLOURS))], 10),
        emblem_pos=(float(rng.choice([0.2, 0.5, 0.8])), float(rng.uniform(0.2, 0.6))),
        emblem_size=float(rng.uniform(0.14, 0.24)),
        extras=[str(x) for x in rng.choice(["statue", "flag", "balustrade", "finials", "buttress"],
                                           size=int(rng.integers(0, 3)), replace=False)],
    )


# --------------------------------------------------------------------------------------
# Drawing helpers
# --------------------------------------------------------------------------------------
_AA = cv2.LINE_AA


def _poly(img, pts, colour, alpha=None):
    pts = np.round(np.asarray(pts, np.float64)).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(img, [pts], colour, _AA)
    if alpha is not None:
        cv2.fillPoly(alpha, [pts], 255, _AA)


def _rect(img, x0, y0, x1, y1, colour, alpha=None, thickness=-1):
    p0 = (int(round(x0)), int(round(y0)))
    p1 = (int(round(x1)), int(round(y1)))
    cv2.rectangle(img, p0, p1, colour, thickness, _AA if thickness > 0 else cv2.LINE_8)
    if alpha is not None:
        cv2.rectangle(alpha, p0, p1, 255, thickness)


def _ellipse(img, cx, cy, ax, ay, colour, alpha=None, a0=0, a1=360, thickness=-1):
    c = (int(round(cx)), int(round(cy)))
    axes = (max(1, int(round(ax))), max(1, int(round(ay))))
    cv2.ellipse(img, c, axes, 0, a0, a1, colour, thickness, _AA)
    if alpha is not None:
        cv2.ellipse(alpha, c, axes, 0, a0, a1, 255, thickness, _AA)


def _texture(img, x0, y0, x1, y1, kind, period, wall, trim):
    """Wall texture inside a rectangle (drawn on a scratch layer, then copied in)."""
    H, W = img.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in (x0, y0, x1, y1))
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    if x1 - x0 < 2 or y1 - y0 < 2 or kind == "plain":
        return
    h, w = y1 - y0, x1 - x0
    layer = img[y0:y1, x0:x1].copy()
    dark = _shade(wall, 0.78)
    p = max(3, period)
    if kind == "bricks":
        for r, y in enumerate(range(0, h, p // 2 + 2)):
            cv2.line(layer, (0, y), (w, y), dark, 2)
            off = (r % 2) * p
            for x in range(off, w, 2 * p):
                cv2.line(layer, (x, y), (x, y + p // 2 + 2), dark, 2)
    elif kind == "bands":
        for y in range(0, h, 2 * p):
            cv2.rectangle(layer, (0, y), (w, y + p - 1), trim, -1)
    elif kind == "ribs":
        for x in range(p // 2, w, p):
            cv2.line(layer, (x, 0), (x, h), dark, 3)
    elif kind == "blocks":
        for y in range(0, h, 2 * p):
            cv2.line(layer, (0, y), (w, y), dark, 2)
        for r, y in enumerate(range(0, h, 2 * p)):
            for x in range((r % 2) * 2 * p, w, 4 * p):
                cv2.line(layer, (x, y), (x, y + 2 * p), dark, 2)
    elif kind == "lattice":
        for k in range(-h, w, 2 * p):
            cv2.line(layer, (k, 0), (k + h, h), dark, 2, _AA)
            cv2.line(layer, (k + h, 0), (k, h), dark, 2, _AA)
    elif kind == "checker":
        for r, y in enumerate(range(0, h, p)):
            for c, x in enumerate(range(0, w, p)):
                if (r + c) % 2:
                    cv2.rectangle(layer, (x, y), (x + p - 1, y + p - 1), trim, -1)
    elif kind == "dots":
        for r, y in enumerate(range(p // 2, h, p)):
            for x in range(p // 2 + (r % 2) * (p // 2), w, p):
                cv2.circle(layer, (x, y), max(2, p // 4), dark, -1, _AA)
    img[y0:y1, x0:x1] = layer


def _window(img, cx, cy, w, h, shape, colour, trim, framed):
    x0, x1, y0, y1 = cx - w / 2, cx + w / 2, cy - h / 2, cy + h / 2
    if framed:
        fr = max(1.0, 0.15 * w)
        _rect(img, x0 - fr, y0 - fr, x1 + fr, y1 + fr, trim)
    if shape == "rect":
        _rect(img, x0, y0, x1, y1, colour)
    elif shape == "square":
        s = min(w, h)
        _rect(img, cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2, colour)
    elif shape == "arched":
        _rect(img, x0, y0 + w / 2, x1, y1, colour)
        _ellipse(img, cx, y0 + w / 2, w / 2, w / 2, colour, a0=180, a1=360)
    elif shape == "round":
        r = min(w, h) / 2
        _ellipse(img, cx, cy, r, r, colour)
    elif shape == "gothic":
        _rect(img, x0, y0 + 0.45 * h, x1, y1, colour)
        _poly(img, [(x0, y0 + 0.45 * h), (cx, y0), (x1, y0 + 0.45 * h)], colour)
    elif shape == "double":
        g = 0.2 * w
        _rect(img, x0, y0, cx - g / 2, y1, colour)
        _rect(img, cx + g / 2, y0, x1, y1, colour)
    elif shape == "slit":
        _rect(img, cx - 0.15 * w, y0, cx + 0.15 * w, y1, colour)
    elif shape == "cross":
        _rect(img, x0, y0, x1, y1, colour)
        t = max(1, int(round(0.12 * w)))
        cv2.line(img, (int(round(cx)), int(round(y0))), (int(round(cx)), int(round(y1))), trim, t)
        yc = int(round(y0 + 0.4 * h))
        cv2.line(img, (int(round(x0)), yc), (int(round(x1)), yc), trim, t)


def _roof(img, alpha, x0, x1, y_top, kind, height, colour, trim):
    """Draw a roof standing on the segment (x0..x1, y_top). Returns the new top y."""
    w = x1 - x0
    cx = (x0 + x1) / 2
    h = height
    if kind == "flat":
        _rect(img, x0 - 0.03 * w, y_top - 0.06 * w, x1 + 0.03 * w, y_top, trim, alpha)
        return y_top - 0.06 * w
    if kind == "gable":
        _poly(img, [(x0 - 0.04 * w, y_top), (cx, y_top - h), (x1 + 0.04 * w, y_top)], colour, alpha)
        return y_top - h
    if kind == "dome":
        _rect(img, x0 + 0.15 * w, y_top - 0.12 * h, x1 - 0.15 * w, y_top, trim, alpha)
        _ellipse(img, cx, y_top - 0.12 * h, 0.36 * w, 0.8 * h, colour, alpha, 180, 360)
        _rect(img, cx - 0.04 * w, y_top - 1.05 * h, cx + 0.04 * w, y_top - 0.85 * h, trim, alpha)
        return y_top - 1.05 * h
    if kind == "spire":
        _poly(img, [(x0, y_top), (cx, y_top - 1.6 * h), (x1, y_top)], colour, alpha)
        return y_top - 1.6 * h
    if kind == "crenel":
        n = max(3, int(round(w / max(4.0, 0.12 * w))) | 1)
        mw = w / n
        for k in range(0, n, 2):
            _rect(img, x0 + k * mw, y_top - 0.12 * w, x0 + (k + 1) * mw, y_top, trim, alpha)
        return y_top - 0.12 * w
    if kind == "hip":
        _poly(img, [(x0, y_top), (x0 + 0.3 * w, y_top - 0.6 * h), (x1 - 0.3 * w, y_top - 0.6 * h),
                    (x1, y_top)], colour, alpha)
        return y_top - 0.6 * h
    if kind == "onion":
        pts = [(x0 + 0.2 * w, y_top), (x0 + 0.02 * w, y_top - 0.45 * h), (cx - 0.12 * w, y_top - 0.95 * h),
               (cx, y_top - 1.4 * h), (cx + 0.12 * w, y_top - 0.95 * h), (x1 - 0.02 * w, y_top - 0.45 * h),
               (x1 - 0.2 * w, y_top)]
        _poly(img, pts, colour, alpha)
        return y_top - 1.4 * h
    if kind == "stepped":
        top = y_top
        for k in range(3):
            inset = 0.14 * w * (k + 1)
            _rect(img, x0 + inset, top - 0.25 * h, x1 - inset, top, trim if k % 2 == 0 else colour, alpha)
            top -= 0.25 * h
        return top
    if kind == "mansard":
        _poly(img, [(x0, y_top), (x0 + 0.08 * w, y_top - 0.5 * h), (x1 - 0.08 * w, y_top - 0.5 * h),
                    (x1, y_top)], colour, alpha)
        nd = max(1, int(w // 28))
        for k in range(nd):
            dx = x0 + (k + 0.5) * w / nd
            _rect(img, dx - 0.03 * w, y_top - 0.35 * h, dx + 0.03 * w, y_top - 0.1 * h, trim)
        return y_top - 0.5 * h
    raise ValueError(f"unknown roof {kind!r}")


def _block(img, alpha, x0, y0, x1, y1, st: BlockStyle, spec: LandmarkSpec, skip_centre=False):
    """A rectangular part of a landmark with its texture, floors, windows and roof."""
    _rect(img, x0, y0, x1, y1, spec.wall, alpha)
    _texture(img, x0, y0, x1, y1, spec.texture, spec.texture_period, spec.wall, spec.trim)
    w, h = x1 - x0, y1 - y0
    if spec.base is not None:
        _rect(img, x0, y1 - spec.base_frac * h, x1, y1, spec.base)
    fh = h / st.floors
    cw = w / st.cols
    if st.pilasters and st.cols > 1:
        for c in range(st.cols + 1):
            x = x0 + c * cw
            _rect(img, x - 0.04 * cw, y0, x + 0.04 * cw, y1, spec.trim)
    for f in range(st.floors):
        fy0 = y0 + f * fh
        if st.cornices and f > 0:
            _rect(img, x0, fy0 - max(1.0, 0.05 * fh), x1, fy0 + max(1.0, 0.05 * fh), spec.trim)
        for c in range(st.cols):
            cx = x0 + (c + 0.5) * cw
            if skip_centre and f == st.floors - 1 and abs(cx - (x0 + x1) / 2) < 0.6 * cw:
                continue
            _window(img, cx, fy0 + 0.5 * fh, st.window_w * cw, st.window_h * fh, st.window,
                    spec.window_colour, spec.trim, st.framed)
    return _roof(img, alpha, x0, x1, y0, st.roof, st.roof_h * w, spec.roof_colour, spec.trim)


def _emblem(img, cx, cy, r, kind, colour, trim):
    """A large sign on the facade: a plain shape on a trim-coloured backing."""
    _ellipse(img, cx, cy, 1.15 * r, 1.15 * r, trim) if kind in ("circle", "star") else \
        _rect(img, cx - 1.1 * r, cy - 1.1 * r, cx + 1.1 * r, cy + 1.1 * r, trim)
    if kind == "circle":
        _ellipse(img, cx, cy, r, r, colour)
    elif kind == "diamond":
        _poly(img, [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], colour)
    elif kind == "star":
        a = np.arange(10) * np.pi / 5 - np.pi / 2
        rad = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        _poly(img, np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], 1), colour)
    elif kind == "triangle":
        _poly(img, [(cx - r, cy + 0.8 * r), (cx, cy - r), (cx + r, cy + 0.8 * r)], colour)
    elif kind == "shield":
        _poly(img, [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + 0.2 * r), (cx, cy + r),
                    (cx - r, cy + 0.2 * r)], colour)
    elif kind == "stripes":
        for k in range(3):
            _rect(img, cx - r, cy - r + k * 0.7 * r, cx + r, cy - r + k * 0.7 * r + 0.35 * r, colour)
    elif kind == "cross":
        _rect(img, cx - 0.3 * r, cy - r, cx + 0.3 * r, cy + r, colour)
        _rect(img, cx - r, cy - 0.3 * r, cx + r, cy + 0.3 * r, colour)


def render_landmark(spec: LandmarkSpec) -> np.ndarray:
    """Draw a landmark front-on; returns an ``(h, w, 4)`` uint8 RGBA canvas cropped to it."""
    S, U = CANVAS, UNIT
    img = np.zeros((S, S, 3), np.uint8)
    alpha = np.zeros((S, S), np.uint8)
    bw = spec.width * U * (0.78 if spec.towers else 0.95)
    bh = spec.height * U
    cx = S / 2
    x0, x1 = cx - bw / 2, cx + bw / 2
    y1 = GROUND_Y - spec.plinth * bh
    y0 = y1 - bh
    # wings first (behind), then towers, then the main body on top
    if spec.wings:
        ww = 0.22 * bw
        wh = spec.wing_h * bh
        for side in (-1, 1):
            wx0, wx1 = (x0 - ww, x0) if side < 0 else (x1, x1 + ww)
            wst = BlockStyle(max(1, spec.main.floors - 1), 2, spec.main.window, spec.main.window_w,
                             spec.main.window_h, spec.main.framed, False, spec.main.cornices, "flat", 0.2)
            _block(img, alpha, wx0, y1 - wh, wx1, y1, wst, spec)
    if spec.towers and spec.tower is not None:
        tw = spec.tower_w * bw
        th = spec.tower_h * bh
        sides = (-1, 1) if spec.towers == 2 else (spec.tower_side,)
        for side in sides:
            tx0 = x0 - 0.5 * tw if side < 0 else x1 - 0.5 * tw
            _block(img, alpha, tx0, y1 - th, tx0 + tw, y1, spec.tower, spec)
            if spec.feature == "clock":
                _ellipse(img, tx0 + tw / 2, y1 - 0.85 * th, 0.32 * tw, 0.32 * tw, (235, 232, 220))
                _ellipse(img, tx0 + tw / 2, y1 - 0.85 * th, 0.32 * tw, 0.32 * tw, spec.trim, thickness=2)
                c = (int(tx0 + tw / 2), int(y1 - 0.85 * th))
                cv2.line(img, c, (c[0], int(c[1] - 0.25 * tw)), (20, 20, 20), 2, _AA)
                cv2.line(img, c, (int(c[0] + 0.18 * tw), c[1]), (20, 20, 20), 2, _AA)
    skip = spec.feature in ("door", "gate", "portico")
    top = _block(img, alpha, x0, y0, x1, y1, spec.main, spec, skip_centre=skip)
    if spec.plinth > 0:
        _rect(img, x0 - 0.03 * bw, y1, x1 + 0.03 * bw, GROUND_Y, _shade(spec.trim, 0.85), alpha)
    fx = cx + spec.asym_shift * bw
    fh = bh / spec.main.floors
    if spec.feature == "door":
        dw = min(0.16 * bw, 0.9 * fh)
        _rect(img, fx - dw / 2, y1 - 0.85 * fh, fx + dw / 2, y1, spec.trim)
        _window(img, fx, y1 - 0.4 * fh, 0.8 * dw, 0.8 * fh, "arched", spec.window_colour, spec.trim, False)
    elif spec.feature == "gate":
        gw = 0.3 * bw
        gh = min(0.7 * bh, 1.6 * gw)
        _rect(img, fx - gw / 2 - 3, y1 - gh - 3, fx + gw / 2 + 3, y1, spec.trim)
        _rect(img, fx - gw / 2, y1 - gh + gw / 2, fx + gw / 2, y1, (24, 24, 28))
        _ellipse(img, fx, y1 - gh + gw / 2, gw / 2, gw / 2, (24, 24, 28), a0=180, a1=360)
    elif spec.feature == "rose":
        r = min(0.16 * bw, 0.45 * bh)
        ry = y0 + 0.35 * bh
        _ellipse(img, fx, ry, r + 2, r + 2, spec.trim)
        _ellipse(img, fx, ry, r, r, spec.window_colour)
        for k in range(8):
            a = k * np.pi / 4
            cv2.line(img, (int(fx), int(ry)), (int(fx + r * np.cos(a)), int(ry + r * np.sin(a))),
                     spec.trim, 2, _AA)
        _ellipse(img, fx, ry, 0.3 * r, 0.3 * r, spec.trim)
    elif spec.feature == "clock" and not spec.towers:
        r = min(0.1 * bw, 0.4 * fh + 3)
        _ellipse(img, fx, top + 0.0, r, r, (235, 232, 220), alpha)
        _ellipse(img, fx, top, r, r, spec.trim, thickness=2)
        cv2.line(img, (int(fx), int(top)), (int(fx), int(top - 0.7 * r)), (20, 20, 20), 2, _AA)
    elif spec.feature == "portico":
        pw = 0.45 * bw
        ph = min(0.8 * bh, 2.2 * fh)
        px0, px1 = fx - pw / 2, fx + pw / 2
        _poly(img, [(px0 - 4, y1 - ph), (fx, y1 - ph - 0.25 * pw), (px1 + 4, y1 - ph)], spec.trim, alpha)
        _rect(img, px0 - 4, y1 - ph, px1 + 4, y1 - ph + 0.1 * ph, _shade(spec.trim, 0.9), alpha)
        ncol = 4 if pw < 60 else 6
        for k in range(ncol):
            x = px0 + (k + 0.5) * pw / ncol
            _rect(img, x - 0.03 * pw, y1 - 0.9 * ph, x + 0.03 * pw, y1, _shade(spec.wall, 1.12))
        _rect(img, px0, y1 - 0.9 * ph, px1, y1, _shade(spec.wall, 0.55), thickness=1)
    elif spec.feature == "arcade":
        n = max(3, spec.main.cols)
        aw = bw / n
        for k in range(n):
            ax = x0 + (k + 0.5) * aw
            _rect(img, ax - 0.3 * aw, y1 - 0.6 * fh, ax + 0.3 * aw, y1, (30, 30, 34))
            _ellipse(img, ax, y1 - 0.6 * fh, 0.3 * aw, 0.3 * aw, (30, 30, 34), a0=180, a1=360)
    if spec.emblem != "none":
        _emblem(img, x0 + spec.emblem_pos[0] * bw, y0 + spec.emblem_pos[1] * bh,
                0.5 * spec.emblem_size * bw, spec.emblem, spec.emblem_colour, spec.trim)
    for extra in spec.extras:
        if extra == "statue":
            sx, sy = cx, top
            _rect(img, sx - 4, sy - 6, sx + 4, sy, spec.trim, alpha)
            _ellipse(img, sx, sy - 14, 3, 8, _shade(spec.roof_colour, 0.9), alpha)
        elif extra == "flag":
            fxp, fy = x1 - 0.1 * bw, y0
            cv2.line(img, (int(fxp), int(fy)), (int(fxp), int(fy - 30)), (60, 60, 60), 2)
            cv2.line(alpha, (int(fxp), int(fy)), (int(fxp), int(fy - 30)), 255, 2)
            _rect(img, fxp, fy - 30, fxp + 16, fy - 20, spec.roof_colour, alpha)
        elif extra == "balustrade":
            for x in np.arange(x0, x1, 5.0):
                _rect(img, x, y0 - 6, x + 2, y0, spec.trim, alpha)
            _rect(img, x0, y0 - 7, x1, y0 - 5, spec.trim, alpha)
        elif extra == "finials":
            for x in (x0, x1):
                _poly(img, [(x - 4, y0), (x, y0 - 18), (x + 4, y0)], spec.roof_colour, alpha)
        elif extra == "buttress":
            for x in np.linspace(x0, x1, 4):
                _poly(img, [(x - 3, y1), (x - 3, y0 + 0.3 * bh), (x + 3, y0 + 0.2 * bh), (x + 7, y1)],
                      _shade(spec.wall, 0.8), alpha)
    ys, xs = np.nonzero(alpha > 8)
    ya, yb = max(0, ys.min() - 1), min(S, ys.max() + 2)
    xa, xb = max(0, xs.min() - 1), min(S, xs.max() + 2)
    out = np.dstack([img[ya:yb, xa:xb], alpha[ya:yb, xa:xb]])
    if max(out.shape[:2]) > MAX_SIDE:
        f = MAX_SIDE / max(out.shape[:2])
        size = (max(1, int(round(out.shape[1] * f))), max(1, int(round(out.shape[0] * f))))
        out = cv2.resize(out, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------
# Scene parts: sky/ground, background buildings, clutter objects
# --------------------------------------------------------------------------------------
SKIES = (
    ((86, 140, 206), (178, 206, 232)),   # clear blue
    ((150, 158, 168), (200, 204, 208)),  # overcast
    ((238, 150, 90), (250, 210, 150)),   # sunset
    ((22, 30, 62), (60, 72, 110)),       # dusk / night
    ((120, 170, 220), (230, 230, 220)),  # hazy
)
GROUNDS = (
    (96, 126, 66), (128, 124, 116), (150, 140, 120), (70, 98, 120), (170, 160, 140), (60, 80, 50),
)


def background(rng: np.random.Generator, h: int, w: int, horizon: int | None = None) -> tuple[np.ndarray, int]:
    """Sky gradient over ground with noise; returns the image and the horizon row."""
    top, bottom = SKIES[rng.integers(len(SKIES))]
    top = np.asarray(_jitter_colour(rng, top, 14), np.float32)
    bottom = np.asarray(_jitter_colour(rng, bottom, 14), np.float32)
    if horizon is None:
        horizon = int(h * rng.uniform(0.55, 0.92))
    horizon = int(min(max(horizon, 0), h))
    t = np.linspace(0.0, 1.0, max(horizon, 1), dtype=np.float32)[:, None]
    g = np.asarray(_jitter_colour(rng, GROUNDS[rng.integers(len(GROUNDS))], 16), np.float32)
    tg = np.linspace(0.0, 1.0, max(h - horizon, 1), dtype=np.float32)[:, None]
    column = np.concatenate([top * (1 - t) + bottom * t, g * (0.85 + 0.3 * tg)])[:h]
    column = np.clip(column + 0.5, 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(np.broadcast_to(column[:, None, :], (h, w, 3)))
    for _ in range(int(rng.integers(0, 4))):  # clouds
        c = _jitter_colour(rng, (236, 236, 240), 10)
        _ellipse(img, rng.uniform(0, w), rng.uniform(0, horizon * 0.6), rng.uniform(0.08, 0.3) * w,
                 rng.uniform(0.03, 0.08) * h, c)
    return img, horizon


def skyline(img: np.ndarray, rng: np.random.Generator, horizon: int, n: int | None = None) -> None:
    """Distant buildings along the horizon (desaturated, low contrast)."""
    h, w = img.shape[:2]
    n = int(rng.integers(0, 5)) if n is None else n
    for _ in range(n):
        bw = rng.uniform(0.06, 0.25) * w
        bh = rng.uniform(0.05, 0.35) * h
        x = rng.uniform(-0.1, 1.0) * w
        c = _jitter_colour(rng, WALL_COLOURS[rng.integers(len(WALL_COLOURS))], 10)
        c = tuple(int(0.55 * v + 0.45 * 170) for v in c)
        _rect(img, x, horizon - bh, x + bw, horizon, c)
        if rng.random() < 0.6:
            wc = _shade(c, 0.7)
            rows = int(rng.integers(1, 5))
            cols = int(rng.integers(1, 6))
            for r in range(rows):
                for k in range(cols):
                    cx = x + (k + 0.5) * bw / cols
                    cy = horizon - bh + (r + 0.5) * bh / rows
                    _rect(img, cx - 0.15 * bw / cols, cy - 0.2 * bh / rows, cx + 0.15 * bw / cols,
                          cy + 0.2 * bh / rows, wc)


def generic_building(img: np.ndarray, rng: np.random.Generator, x0, y1, bw, bh) -> None:
    """A plain, nearby building (grid of windows, flat or gable roof): clutter, not a landmark."""
    c = _jitter_colour(rng, WALL_COLOURS[rng.integers(len(WALL_COLOURS))], 16)
    _rect(img, x0, y1 - bh, x0 + bw, y1, c)
    wc = _jitter_colour(rng, WINDOW_COLOURS[rng.integers(len(WINDOW_COLOURS))], 10)
    rows = max(1, int(bh / max(6.0, rng.uniform(10, 22))))
    cols = max(1, int(bw / max(6.0, rng.uniform(10, 22))))
    shape = str(rng.choice(("rect", "square", "slit", "arched")))
    for r in range(rows):
        for k in range(cols):
            _window(img, x0 + (k + 0.5) * bw / cols, y1 - bh + (r + 0.5) * bh / rows, 0.45 * bw / cols,
                    0.5 * bh / rows, shape, wc, _shade(c, 0.8), False)
    if rng.random() < 0.5:
        rc = _jitter_colour(rng, ROOF_COLOURS[rng.integers(len(ROOF_COLOURS))], 10)
        _poly(img, [(x0, y1 - bh), (x0 + bw / 2, y1 - bh - rng.uniform(0.1, 0.4) * bw), (x0 + bw, y1 - bh)], rc)


def clutter_object(img: np.ndarray, rng: np.random.Generator, cx, base_y, size) -> None:
    """One foreground object standing on ``base_y``: tree, person, car, post, sign or bush."""
    kind = rng.choice(["tree", "tree", "person", "car", "post", "sign", "bush"])
    if kind == "tree":
        trunk = _jitter_colour(rng, (90, 66, 44), 10)
        leaf = _jitter_colour(rng, [(52, 100, 44), (80, 120, 50), (150, 110, 40), (34, 70, 38)][rng.integers(4)], 12)
        _rect(img, cx - 0.06 * size, base_y - 0.5 * size, cx + 0.06 * size, base_y, trunk)
        for _ in range(int(rng.integers(3, 7))):
            _ellipse(img, cx + rng.normal(0, 0.18) * size, base_y - size * rng.uniform(0.55, 0.95),
                     size * rng.uniform(0.15, 0.3), size * rng.uniform(0.15, 0.3), _shade(leaf, rng.uniform(0.8, 1.2)))
    elif kind == "person":
        col = _jitter_colour(rng, (100, 100, 110), 60)
        s = 0.5 * size
        _rect(img, cx - 0.12 * s, base_y - 0.75 * s, cx + 0.12 * s, base_y, col)
        _ellipse(img, cx, base_y - 0.85 * s, 0.09 * s, 0.1 * s, _jitter_colour(rng, (190, 150, 120), 30))
    elif kind == "car":
        col = _jitter_colour(rng, (120, 120, 120), 70)
        s = 0.6 * size
        _rect(img, cx - 0.5 * s, base_y - 0.35 * s, cx + 0.5 * s, base_y - 0.08 * s, col)
        _rect(img, cx - 0.3 * s, base_y - 0.55 * s, cx + 0.25 * s, base_y - 0.35 * s, _shade(col, 0.8))
        for dx in (-0.3, 0.3):
            _ellipse(img, cx + dx * s, base_y - 0.08 * s, 0.09 * s, 0.09 * s, (25, 25, 25))
    elif kind == "post":
        col = _jitter_colour(rng, (50, 52, 56), 10)
        _rect(img, cx - 0.02 * size, base_y - 1.2 * size, cx + 0.02 * size, base_y, col)
        _ellipse(img, cx, base_y - 1.2 * size, 0.06 * size, 0.05 * size, _jitter_colour(rng, (230, 220, 170), 20))
    elif kind == "sign":
        col = _jitter_colour(rng, [(200, 40, 40), (40, 80, 170), (230, 200, 40), (40, 140, 60)][rng.integers(4)], 15)
        _rect(img, cx - 0.02 * size, base_y - 0.9 * size, cx + 0.02 * size, base_y, (70, 70, 74))
        _rect(img, cx - 0.2 * size, base_y - 1.1 * size, cx + 0.2 * size, base_y - 0.8 * size, col)
    else:  # bush
        leaf = _jitter_colour(rng, (60, 104, 48), 15)
        for _ in range(int(rng.integers(2, 5))):
            _ellipse(img, cx + rng.normal(0, 0.2) * size, base_y - 0.15 * size, 0.25 * size, 0.2 * size,
                     _shade(leaf, rng.uniform(0.8, 1.2)))
