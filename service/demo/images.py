"""Draw the demo's sample pictures (227x227 RGB): synthetic, so the repo may ship them, and chosen
so conv1's edge and colour filters each find something to respond to."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

SIDE = 227


def grating(orientation: float, period: float, side: int = SIDE) -> np.ndarray:
    """Return a (side, side) grating in [0, 1] whose stripes run at `orientation` degrees."""
    r = np.arange(side, dtype=np.float64)
    y, x = np.meshgrid(r, r, indexing="ij")
    normal = np.deg2rad(orientation + 90.0)
    across = x * np.cos(normal) - y * np.sin(normal)  # image rows grow downwards
    return 0.5 + 0.5 * np.cos(2 * np.pi * across / period)


def _to_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat((grey * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def stripes_quadrants() -> np.ndarray:
    """Return (227, 227, 3) uint8: gratings at 0 / 45 / 90 / 135 degrees, one per quadrant."""
    h = SIDE // 2
    img = np.empty((SIDE, SIDE), np.float64)
    img[:h, :h] = grating(0, 8)[:h, :h]
    img[:h, h:] = grating(45, 8)[:h, h:]
    img[h:, :h] = grating(90, 8)[h:, :h]
    img[h:, h:] = grating(135, 8)[h:, h:]
    return _to_rgb(img)


def rings() -> np.ndarray:
    """Return (227, 227, 3) uint8: concentric rings, every orientation, period growing outwards."""
    r = np.arange(SIDE) - (SIDE - 1) / 2
    y, x = np.meshgrid(r, r, indexing="ij")
    radius = np.hypot(x, y)
    return _to_rgb(0.5 + 0.5 * np.cos(2 * np.pi * np.sqrt(radius * 6.0) / 3.0))


def colour_blobs() -> np.ndarray:
    """Return (227, 227, 3) uint8: soft blobs of 12 hues on mid grey, in a 4x3 grid."""
    img = Image.new("RGB", (SIDE, SIDE), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        hue = i * 30
        rgb = Image.new("HSV", (1, 1), (round(hue / 360 * 255), 230, 230)).convert("RGB")
        cx, cy = 30 + (i % 4) * 56, 40 + (i // 4) * 74
        draw.ellipse((cx - 20, cy - 20, cx + 20, cy + 20), fill=rgb.getpixel((0, 0)))
    return np.asarray(img)


def scene() -> np.ndarray:
    """Return (227, 227, 3) uint8: a house under a sky with the sun, a tree and a striped fence."""
    img = Image.new("RGB", (SIDE, SIDE))
    sky = np.linspace(0, 1, 140)[:, None]
    top, bottom = np.array([40, 90, 200]), np.array([170, 210, 250])
    gradient = np.broadcast_to((top + (bottom - top) * sky)[:, None, :], (140, SIDE, 3))
    img.paste(Image.fromarray(gradient.astype(np.uint8)))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 140, SIDE, SIDE), fill=(60, 150, 50))  # grass
    draw.ellipse((170, 15, 210, 55), fill=(250, 210, 40))  # sun
    draw.rectangle((40, 95, 130, 165), fill=(190, 50, 40))  # house
    draw.polygon([(30, 97), (85, 50), (140, 97)], fill=(90, 50, 30))  # roof
    draw.rectangle((75, 125, 95, 165), fill=(70, 40, 20))  # door
    for x0 in (50, 105):
        draw.rectangle((x0, 110, x0 + 15, 125), fill=(230, 240, 250))  # windows
    draw.rectangle((175, 120, 185, 170), fill=(100, 60, 30))  # trunk
    draw.ellipse((155, 80, 205, 130), fill=(30, 110, 40))  # crown
    for x0 in range(0, SIDE, 8):
        draw.rectangle((x0, 185, x0 + 3, 215), fill=(245, 245, 235))  # fence pickets
    return np.asarray(img)


def png_bytes(rgb: np.ndarray) -> bytes:
    """Encode a (H, W, 3) uint8 array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def demo_images() -> list[tuple[str, bytes]]:
    """Return [(filename, png_bytes)] of the sample pictures, in a fixed order."""
    pictures = (
        ("scene.png", scene),
        ("stripes.png", stripes_quadrants),
        ("colour-blobs.png", colour_blobs),
        ("rings.png", rings),
    )
    return [(name, png_bytes(draw())) for name, draw in pictures]
