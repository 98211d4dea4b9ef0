"""Views of a landmark: viewpoint, scale, crop, illumination, blur, occlusion, clutter.

:func:`sample_view` draws the parameters of one view for a difficulty *category*:

``query``  front-on, large, unoccluded, mild light (the benchmark's query images);
``easy``   mild change from the query: small viewpoint/scale change, little occlusion;
``hard``   one or two strong changes among viewpoint (perspective), scale (zoomed out or
           cropped in), illumination (dusk/night, strong colour cast), occlusion and blur;
``junk``   barely visible: tiny, mostly cropped out, heavily occluded or extreme angle.

:func:`render_view` renders it at twice the output size, downsamples (area), then applies
light, blur and noise, and measures what is visible so the category can be checked
(:func:`category_ok`). :func:`render_clutter` draws a scene with no landmark in it.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .render import background, clutter_object, generic_building, skyline

SUPERSAMPLE = 2
ASPECTS = (4 / 3, 3 / 2, 16 / 10, 1.0, 3 / 4, 2 / 3, 5 / 4, 4 / 5)  # width / height
CATEGORIES = ("query", "easy", "hard", "junk")
HARD_FACTORS = ("viewpoint", "scale", "light", "occlusion", "blur")


@dataclass
class View:
    """Parameters of one view (all sizes relative to the output image)."""

    category: str
    width: int
    height: int
    scale: float          # landmark's larger relative extent in the image (1 = fills it)
    cx: float             # landmark centre, fraction of width
    cy: float             # landmark centre, fraction of height
    yaw: float            # perspective: relative height difference of left and right edges
    pitch: float          # perspective: relative narrowing of the top edge
    roll: float           # in-plane rotation, degrees
    occluders: int        # number of foreground objects
    occluder_size: float  # their size, fraction of the image height
    wall_occluder: float  # width fraction of a near building covering one side (0: none)
    gain: float
    cast: tuple           # per-channel multipliers
    gamma: float
    saturation: float
    shading: float        # strength of a linear light gradient across the image
    blur: float           # Gaussian sigma at output resolution
    motion: int           # motion-blur kernel length (0: none)
    noise: float
    quality: int          # JPEG quality


def image_size(rng: np.random.Generator, long_side: int) -> tuple[int, int]:
    """(width, height) with a varied aspect ratio and the given long side."""
    a = ASPECTS[rng.integers(len(ASPECTS))]
    if a >= 1:
        return long_side, max(16, int(round(long_side / a)))
    return max(16, int(round(long_side * a))), long_side


def sample_view(rng: np.random.Generator, category: str, long_side: int) -> View:
    if category not in CATEGORIES:
        raise ValueError(f"unknown view category {category!r}; valid: {CATEGORIES}")
    w, h = image_size(rng, long_side)
    u = rng.uniform
    sgn = lambda: float(rng.choice([-1.0, 1.0]))  # noqa: E731
    if category == "query":
        scale, yaw, pitch, roll = u(0.72, 0.9), u(-0.1, 0.1), u(0.0, 0.06), u(-2, 2)
        cx, cy = u(0.42, 0.58), u(0.45, 0.55)
        occ, occ_size, wall = int(rng.integers(0, 2)), u(0.1, 0.2), 0.0
        gain, cast_amp, gamma, sat, shading = u(0.9, 1.1), 0.05, u(0.9, 1.1), u(0.9, 1.1), u(0, 0.1)
        blur, motion, noise = u(0, 0.4), 0, u(0, 2)
    elif category == "easy":
        scale, yaw, pitch, roll = u(0.7, 1.0), u(-0.15, 0.15), u(0.0, 0.1), u(-3, 3)
        cx, cy = u(0.4, 0.6), u(0.42, 0.58)
        occ, occ_size, wall = int(rng.integers(0, 2)), u(0.1, 0.25), 0.0
        gain, cast_amp, gamma, sat, shading = u(0.85, 1.15), 0.06, u(0.9, 1.1), u(0.85, 1.1), u(0, 0.2)
        blur, motion, noise = u(0, 0.5), 0, u(0, 3)
    elif category == "hard":
        # an easy-like view in which one or two factors change strongly
        scale, yaw, pitch, roll = u(0.6, 0.95), u(-0.15, 0.15), u(0.0, 0.1), u(-3, 3)
        cx, cy = u(0.38, 0.62), u(0.4, 0.6)
        occ, occ_size, wall = int(rng.integers(0, 2)), u(0.1, 0.25), 0.0
        gain, cast_amp, gamma, sat, shading = u(0.8, 1.2), 0.08, u(0.85, 1.15), u(0.8, 1.1), u(0, 0.25)
        blur, motion, noise = u(0.2, 0.7), 0, u(0.5, 4)
        strong = rng.choice(HARD_FACTORS, size=int(rng.choice([1, 2], p=[0.6, 0.4])), replace=False)
        for f in strong:
            if f == "viewpoint":
                yaw, pitch, roll = sgn() * u(0.28, 0.45), u(0.1, 0.3), u(-8, 8)
            elif f == "scale":
                if rng.random() < 0.5:
                    scale, cx, cy = u(0.38, 0.55), u(0.3, 0.7), u(0.35, 0.65)
                else:
                    scale, cx, cy = u(1.1, 1.4), u(0.3, 0.7), u(0.3, 0.7)
            elif f == "light":
                if rng.random() < 0.4:
                    gain, cast_amp, gamma, sat = u(0.3, 0.5), 0.2, u(1.0, 1.4), u(0.4, 0.8)
                else:
                    gain, cast_amp, gamma, sat = u(0.55, 1.5), 0.25, u(0.6, 1.5), u(0.4, 1.3)
                shading = u(0.3, 0.6)
            elif f == "occlusion":
                occ, occ_size = int(rng.integers(2, 5)), u(0.3, 0.5)
                wall = u(0.15, 0.3) if rng.random() < 0.5 else 0.0
            else:  # blur
                blur, motion = u(1.0, 1.6), int(rng.choice([0, 3, 5]))
    else:  # junk
        mode = rng.choice(["tiny", "cropped", "occluded", "extreme"])
        scale, yaw, pitch, roll = u(0.5, 0.8), u(-0.3, 0.3), u(0.0, 0.2), u(-5, 5)
        cx, cy = u(0.35, 0.65), u(0.4, 0.6)
        occ, occ_size, wall = int(rng.integers(0, 4)), u(0.15, 0.4), 0.0
        if mode == "tiny":
            scale = u(0.1, 0.17)
            cx, cy = u(0.15, 0.85), u(0.3, 0.8)
        elif mode == "cropped":
            scale = u(0.6, 1.0)
            cx = float(rng.choice([u(-0.25, -0.05), u(1.05, 1.25)]))
        elif mode == "occluded":
            wall = u(0.65, 0.85)
        else:
            yaw, pitch, scale = sgn() * u(0.65, 0.8), u(0.3, 0.45), u(0.35, 0.7)
            cx = float(rng.choice([u(0.0, 0.15), u(0.85, 1.0)]))
        gain, cast_amp, gamma, sat, shading = u(0.5, 1.4), 0.2, u(0.7, 1.4), u(0.5, 1.2), u(0, 0.4)
        blur, motion, noise = u(0.2, 1.2), int(rng.choice([0, 3])), u(1, 5)
    cast = tuple(float(c) for c in 1.0 + rng.uniform(-cast_amp, cast_amp, 3))
    return View(category, w, h, float(scale), float(cx), float(cy), float(yaw), float(pitch),
                float(roll), occ, float(occ_size), float(wall), float(gain), cast, float(gamma),
                float(sat), float(shading), float(blur), motion, float(noise),
                int(rng.integers(72, 96)))


def _homography(lm_h: int, lm_w: int, v: View) -> tuple[np.ndarray, np.ndarray]:
    """Homography from the landmark canvas to the (supersampled) view, and the target quad."""
    W, H = v.width * SUPERSAMPLE, v.height * SUPERSAMPLE
    t, p = v.yaw, v.pitch
    qx = np.array([-(1 - p), (1 - p), 1, -1], np.float64) * 0.5
    qy = np.array([-(1 - t), -(1 + t), (1 + t), (1 - t)], np.float64) * 0.5
    qx *= 1.0 - 0.45 * abs(t)           # foreshortening of the width
    # scale so the landmark's larger relative extent equals v.scale
    sx = lm_w * (qx.max() - qx.min())
    sy = lm_h * (qy.max() - qy.min())
    k = v.scale / max(sx / W, sy / H)
    qx, qy = qx * lm_w * k, qy * lm_h * k
    a = np.deg2rad(v.roll)
    rx = qx * np.cos(a) - qy * np.sin(a) + v.cx * W
    ry = qx * np.sin(a) + qy * np.cos(a) + v.cy * H
    dst = np.stack([rx, ry], 1).astype(np.float32)
    src = np.array([[0, 0], [lm_w, 0], [lm_w, lm_h], [0, lm_h]], np.float32)
    return cv2.getPerspectiveTransform(src, dst), dst


def _light(img: np.ndarray, v: View, rng: np.random.Generator) -> np.ndarray:
    """Saturation, a linear light gradient, gain with a colour cast, gamma and sensor noise."""
    x = img.astype(np.float32)
    if v.saturation != 1.0:
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY).astype(np.float32)
        x = cv2.addWeighted(x, v.saturation, cv2.merge([grey, grey, grey]), 1.0 - v.saturation, 0.0)
    h, w = x.shape[:2]
    if v.shading > 0:
        ang = rng.uniform(0, 2 * np.pi)
        gx = np.cos(ang) * (np.arange(w, dtype=np.float32) / w - 0.5)
        gy = np.sin(ang) * (np.arange(h, dtype=np.float32) / h - 0.5)
        x *= (1.0 + np.float32(v.shading) * (gy[:, None] + gx[None, :]))[..., None]
    x *= (np.float32(v.gain / 255.0) * np.asarray(v.cast, np.float32))
    np.clip(x, 0.0, 1.0, out=x)
    if v.gamma != 1.0:
        x **= np.float32(v.gamma)
    x *= np.float32(255.0)
    if v.noise > 0:
        cv2.setRNGSeed(int(rng.integers(0, 2**31 - 1)))
        noise = np.empty_like(x)
        cv2.randn(noise, (0.0, 0.0, 0.0), (float(v.noise),) * 3)
        x += noise
    x += np.float32(0.5)
    np.clip(x, 0, 255, out=x)
    return x.astype(np.uint8)


def _blur(img: np.ndarray, v: View) -> np.ndarray:
    if v.blur > 0.25:
        img = cv2.GaussianBlur(img, (0, 0), v.blur)
    if v.motion > 1:
        k = np.zeros((v.motion, v.motion), np.float32)
        k[v.motion // 2] = 1.0 / v.motion
        img = cv2.filter2D(img, -1, k)
    return img


def _foreground(img: np.ndarray, rng: np.random.Generator, v: View, horizon: int) -> None:
    """Foreground occluders: objects on the ground and an optional near building."""
    H, W = img.shape[:2]
    for _ in range(v.occluders):
        size = v.occluder_size * H * rng.uniform(0.7, 1.3)
        base = rng.uniform(max(horizon, 0.7 * H), H * 1.02)
        clutter_object(img, rng, rng.uniform(0.0, 1.0) * W, base, size)
    if v.wall_occluder > 0:
        bw = v.wall_occluder * W
        left = rng.random() < 0.5
        x0 = 0 - rng.uniform(0, 0.05) * W if left else W - bw + rng.uniform(0, 0.05) * W
        generic_building(img, rng, x0, H * 1.02, bw + 0.05 * W, H * rng.uniform(0.8, 1.1))


def render_view(landmark: np.ndarray, v: View, rng: np.random.Generator) -> tuple[np.ndarray, list, dict]:
    """Render one view of a landmark canvas (RGBA from ``render_landmark``).

    Returns ``(rgb uint8 (h, w, 3), bbx [x1, y1, x2, y2] of the landmark or None, stats)``
    where stats holds ``visible`` (fraction of the landmark's area visible in the image,
    unoccluded) and ``area`` (fraction of the image the visible landmark covers).
    """
    W, H = v.width * SUPERSAMPLE, v.height * SUPERSAMPLE
    lm_h, lm_w = landmark.shape[:2]
    M, quad = _homography(lm_h, lm_w, v)
    warped = cv2.warpPerspective(landmark, M, (W, H), flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    base_y = float(quad[2:, 1].max())
    horizon = int(np.clip(base_y + rng.uniform(-0.06, 0.04) * H, 0.3 * H, H - 2))
    img, _ = background(rng, H, W, horizon)
    skyline(img, rng, horizon)
    # composite only inside the landmark's bounding box (most of the image is background)
    x0, y0 = np.floor(quad.min(axis=0)).astype(int)
    x1, y1 = np.ceil(quad.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    lm_mask = np.zeros((H, W), bool)
    visible_px = 0.0
    if x1 > x0 and y1 > y0:
        wr = warped[y0:y1, x0:x1]
        a = wr[..., 3:4].astype(np.float32) * np.float32(1.0 / 255.0)
        bg = img[y0:y1, x0:x1].astype(np.float32)
        img[y0:y1, x0:x1] = (bg + (wr[..., :3].astype(np.float32) - bg) * a + 0.5).astype(np.uint8)
        lm_mask[y0:y1, x0:x1] = wr[..., 3] > 127
    before = img[y0:y1, x0:x1].copy() if x1 > x0 and y1 > y0 else None
    _foreground(img, rng, v, horizon)
    if before is not None:
        occluded = np.any(img[y0:y1, x0:x1] != before, axis=2)
        visible_px = float(np.count_nonzero(lm_mask[y0:y1, x0:x1] & ~occluded))
    canvas_fill = float(np.count_nonzero(landmark[..., 3] > 127)) / float(lm_h * lm_w)
    quad_area = 0.5 * abs(float(np.dot(quad[:, 0], np.roll(quad[:, 1], 1)) - np.dot(quad[:, 1], np.roll(quad[:, 0], 1))))
    full_px = max(1.0, canvas_fill * quad_area)
    stats = {"visible": min(1.0, visible_px / full_px), "area": visible_px / float(W * H)}
    small = cv2.resize(img, (v.width, v.height), interpolation=cv2.INTER_AREA)
    small = _blur(_light(small, v, rng), v)
    rows = np.flatnonzero(lm_mask.any(axis=1))
    cols = np.flatnonzero(lm_mask.any(axis=0))
    bbx = None
    if len(rows):
        m, f = 1.0, 1.0 / SUPERSAMPLE  # one-pixel margin, clipped to the image
        bbx = [max(0.0, np.floor(cols[0] * f) - m), max(0.0, np.floor(rows[0] * f) - m),
               min(float(v.width), np.ceil((cols[-1] + 1) * f) + m),
               min(float(v.height), np.ceil((rows[-1] + 1) * f) + m)]
        bbx = [float(b) for b in bbx]
    return small, bbx, stats


def category_ok(category: str, stats: dict, v: View) -> bool:
    """Does a rendered view's measured visibility match its category?"""
    vis, area = stats["visible"], stats["area"]
    if category == "query":
        return vis >= 0.9
    if category == "easy":
        return vis >= 0.8 and area >= 0.06
    if category == "hard":
        return vis >= 0.45 and area >= 0.03
    return 0.05 <= vis < 0.35 or (vis >= 0.05 and area < 0.03)  # junk: barely visible


def render_clutter(rng: np.random.Generator, long_side: int) -> np.ndarray:
    """A street scene with no landmark: skyline, plain buildings, trees, people, cars."""
    w, h = image_size(rng, long_side)
    W, H = w * SUPERSAMPLE, h * SUPERSAMPLE
    img, horizon = background(rng, H, W)
    skyline(img, rng, horizon, n=int(rng.integers(2, 9)))
    for _ in range(int(rng.integers(1, 5))):
        bw = rng.uniform(0.15, 0.6) * W
        generic_building(img, rng, rng.uniform(-0.2, 0.9) * W, horizon + rng.uniform(0, 0.1) * H, bw,
                         rng.uniform(0.2, 0.8) * H)
    for _ in range(int(rng.integers(0, 6))):
        clutter_object(img, rng, rng.uniform(0, W), rng.uniform(horizon, H), rng.uniform(0.1, 0.5) * H)
    v = View("clutter", w, h, 0, 0, 0, 0, 0, 0, 0, 0, 0, float(rng.uniform(0.5, 1.4)),
             tuple(float(c) for c in 1.0 + rng.uniform(-0.15, 0.15, 3)), float(rng.uniform(0.7, 1.4)),
             float(rng.uniform(0.5, 1.2)), float(rng.uniform(0, 0.4)), float(rng.uniform(0, 1.0)),
             int(rng.choice([0, 0, 3])), float(rng.uniform(0, 4)), int(rng.integers(72, 96)))
    small = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return _blur(_light(small, v, rng), v)
