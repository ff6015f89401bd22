"""Painting the synthetic world: textured backgrounds, object shapes and two-colour object textures (numpy)."""

from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np

TEXTURES: tuple[str, ...] = (
    "horizontal_stripes", "vertical_stripes", "diagonal_stripes", "checkerboard", "dots", "rings", "grid", "zigzag"
)
"""Object textures; each class of the world has one."""

SHAPES: tuple[str, ...] = ("circle", "ellipse", "square", "blob")
"""Object outlines, drawn independently of the class."""

BACKGROUND_KINDS: tuple[str, ...] = ("grass", "sky", "water", "sand")
"""Background textures."""


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


@lru_cache(maxsize=8)
def _pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    ys.setflags(write=False), xs.setflags(write=False)  # shared between calls
    return ys, xs


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a ``cells x cells`` random grid bilinearly upsampled to ``(height, width)``."""
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    gy = np.linspace(0, cells, height, dtype=np.float32)
    gx = np.linspace(0, cells, width, dtype=np.float32)
    y0 = np.minimum(gy.astype(np.int64), cells - 1)
    x0 = np.minimum(gx.astype(np.int64), cells - 1)
    wy = (gy - y0)[:, None]
    wx = (gx - x0)[None, :]
    top = grid[y0][:, x0] * (1 - wx) + grid[y0][:, x0 + 1] * wx
    bottom = grid[y0 + 1][:, x0] * (1 - wx) + grid[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def _background(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Paint a background of the given kind as a float32 ``(H, W, 3)`` image: two tinted colours blended by a map."""
    ys, xs = _pixel_grid(height, width)
    side = min(height, width)
    if kind == "grass":  # green-ish, low-frequency blotches plus fine grain
        hue = rng.uniform(0.20, 0.38)
        dark, light = _hsv(hue, rng.uniform(0.5, 0.8), 0.3), _hsv(hue + 0.03, rng.uniform(0.4, 0.7), 0.7)
        blend = 0.6 * _smooth_noise(rng, height, width, 4) + 0.4 * rng.random((height, width), dtype=np.float32)
    elif kind == "sky":  # smooth gradient with faint clouds
        hue = rng.uniform(0.52, 0.64)
        dark, light = _hsv(hue, rng.uniform(0.5, 0.8), 0.75), _hsv(hue, 0.15, 1.0)
        slope = rng.uniform(-0.3, 0.3)
        blend = np.clip(ys / height + slope * (xs / width - 0.5), 0, 1) * 0.8
        blend = blend + 0.2 * _smooth_noise(rng, height, width, 3)
    elif kind == "water":  # soft horizontal waves, wider than any object texture
        hue = rng.uniform(0.45, 0.60)
        dark, light = _hsv(hue, rng.uniform(0.6, 0.9), 0.4), _hsv(hue, rng.uniform(0.3, 0.6), 0.7)
        wavelength = rng.uniform(0.15, 0.25) * side
        swell = rng.uniform(0.4, 0.8) * side
        wobble = rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * xs / swell + rng.uniform(0, 2 * np.pi))
        blend = 0.5 + 0.35 * np.sin(2 * np.pi * (ys / wavelength + wobble))
        blend = blend + 0.15 * (_smooth_noise(rng, height, width, 3) - 0.5)
    elif kind == "sand":  # beige with salt-and-pepper speckle
        hue = rng.uniform(0.07, 0.14)
        dark, light = _hsv(hue, rng.uniform(0.3, 0.5), 0.55), _hsv(hue, rng.uniform(0.2, 0.4), 0.9)
        speckle = rng.random((height, width), dtype=np.float32)
        blend = 0.7 + 0.2 * _smooth_noise(rng, height, width, 3) - 0.6 * (speckle < 0.08)
        blend = blend + 0.3 * (speckle > 0.95)
    else:
        raise ValueError(f"Unknown background kind {kind!r}: use one of {BACKGROUND_KINDS}")
    blend = np.clip(blend, 0.0, 1.0)[..., None]
    return dark * (1 - blend) + light * blend


def _shape_mask(shape: str, rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of a shape centred at ``dy = dx = 0`` whose area is about that of a disc of ``radius``."""
    angle = rng.uniform(0, np.pi)
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    if shape == "circle":
        return u * u + v * v <= radius * radius
    if shape == "ellipse":
        stretch = rng.uniform(1.2, 1.6)
        return (u / (radius * stretch)) ** 2 + (v * stretch / radius) ** 2 <= 1.0
    if shape == "square":
        half = 0.886 * radius  # same area as the disc
        return np.maximum(np.abs(u), np.abs(v)) <= half
    if shape == "blob":  # radius modulated by a few random harmonics of the polar angle
        theta = np.arctan2(v, u)
        bound = np.ones_like(theta)
        for k in (2, 3, 5):
            bound += rng.uniform(0.0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
        return u * u + v * v <= (radius * bound) ** 2
    raise ValueError(f"Unknown shape {shape!r}: use one of {SHAPES}")


def _texture(texture: str, rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, period: float) -> np.ndarray:
    """Boolean two-colour pattern of ``texture`` at offsets ``(dy, dx)`` from the object centre."""
    jitter = np.deg2rad(rng.uniform(-10, 10))
    base = {"vertical_stripes": np.pi / 2, "diagonal_stripes": rng.choice([np.pi / 4, -np.pi / 4])}.get(texture, 0.0)
    angle = base + jitter
    # u runs along the texture's main direction, v across it (stripes vary along v).
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    phase_u, phase_v = rng.random(2)
    if texture in ("horizontal_stripes", "vertical_stripes", "diagonal_stripes"):
        return (v / period + phase_v) % 1.0 < rng.uniform(0.4, 0.6)
    if texture == "checkerboard":
        cell = 0.6 * period
        return (np.floor(u / cell + phase_u) + np.floor(v / cell + phase_v)) % 2 == 0
    if texture == "dots":
        fu = (u / period + phase_u) % 1.0 - 0.5
        fv = (v / period + phase_v) % 1.0 - 0.5
        return fu * fu + fv * fv < rng.uniform(0.24, 0.32) ** 2
    if texture == "rings":  # thin rings, so that a patch far from the centre differs from stripes by more than bend
        cy, cx = rng.uniform(-0.5, 0.5, size=2) * period
        return (np.sqrt((dy - cy) ** 2 + (dx - cx) ** 2) / period + phase_v) % 1.0 < rng.uniform(0.25, 0.32)
    if texture == "grid":
        width = rng.uniform(0.22, 0.3)
        return ((u / period + phase_u) % 1.0 < width) | ((v / period + phase_v) % 1.0 < width)
    if texture == "zigzag":
        length = rng.uniform(1.2, 1.8) * period
        tri = 2 * np.abs((u / length + phase_u) % 1.0 - 0.5)  # triangle wave in [0, 1]
        return ((v + rng.uniform(0.5, 0.7) * period * tri) / period + phase_v) % 1.0 < 0.5
    raise ValueError(f"Unknown texture {texture!r}: use one of {TEXTURES}")
