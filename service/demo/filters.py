"""Build the demo's conv1 filter bank: 96 readable 11x11x3 filters, like AlexNet's first layer.

Filters are OHWI (K=96, FH=11, FW=11, C=3) float32, each of unit L2 norm, laid out as 8 rows of 12
so the tile picture reads like Krizhevsky et al.'s conv1 figure:
- rows 0-3: luminance Gabors, 6 edge orientations x (even, odd) phase, one wavelength per row;
- rows 4-5: colour-opponent Gabors (red-green, blue-yellow), 6 orientations x 2 channels per row;
- row 6: colour blobs of 12 hues; row 7: luminance centre-surround (on/off x 3 sizes) and 6 large
  hue blobs.
Orientation is the angle of the edge itself, counter-clockwise from horizontal: 90 is a vertical
edge, so vertical stripes (brightness varying along x) excite the 90-degree filters.
"""

from __future__ import annotations

import numpy as np

SIZE = 11
ORIENTATIONS = (0, 30, 60, 90, 120, 150)  # degrees, edge angle
WAVELENGTHS = (3.0, 4.5, 6.5, 9.0)  # pixels per cycle, one per luminance row
HUES = tuple(range(0, 360, 30))  # degrees on the red-green / blue-yellow plane

# Colour directions in (R, G, B), applied after the model's per-channel normalisation.
LUMINANCE = np.array([1.0, 1.0, 1.0]) / np.sqrt(3.0)
RED_GREEN = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
BLUE_YELLOW = np.array([-0.5, -0.5, 1.0]) / np.sqrt(1.5)


def _grid() -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y_up) pixel offsets from the filter centre, each (SIZE, SIZE)."""
    r = np.arange(SIZE) - (SIZE - 1) / 2
    y, x = np.meshgrid(r, r, indexing="ij")
    return x, -y  # rows grow downwards; angles are measured with y pointing up


def gabor(orientation: float, wavelength: float, phase: str) -> np.ndarray:
    """Return a zero-mean (SIZE, SIZE) Gabor for an edge at `orientation` deg; phase even|odd."""
    x, y = _grid()
    normal = np.deg2rad(orientation + 90.0)  # the pattern varies across the edge
    across = x * np.cos(normal) + y * np.sin(normal)
    along = -x * np.sin(normal) + y * np.cos(normal)
    sigma = min(0.56 * wavelength, 2.8)  # about one octave of bandwidth, kept inside the window
    envelope = np.exp(-(across**2 + (0.7 * along) ** 2) / (2 * sigma**2))
    carrier = np.cos if phase == "even" else np.sin
    g = envelope * carrier(2 * np.pi * across / wavelength)
    return g - envelope * (g.sum() / envelope.sum())  # no response to flat regions


def blob(sigma: float) -> np.ndarray:
    """Return a (SIZE, SIZE) Gaussian of width sigma pixels."""
    x, y = _grid()
    return np.exp(-(x**2 + y**2) / (2 * sigma**2))


def centre_surround(sigma: float) -> np.ndarray:
    """Return a zero-mean difference of Gaussians (centre sigma, surround 2 sigma)."""
    centre, surround = blob(sigma), blob(2 * sigma)
    return centre / centre.sum() - surround / surround.sum()


def hue_direction(hue: float) -> np.ndarray:
    """Return the unit (R, G, B) direction of `hue` degrees: 0 red, 120 ~green, 240 ~blue."""
    # Built from actual hue colours minus their grey so each filter prefers that hue.
    h = np.deg2rad(hue)
    rgb = np.array([np.cos(h), np.cos(h - 2 * np.pi / 3), np.cos(h + 2 * np.pi / 3)])
    return rgb / np.linalg.norm(rgb)


def _bank() -> list[tuple[str, np.ndarray]]:
    """Return the 96 (label, (SIZE, SIZE, 3)) filters in display order."""
    out: list[tuple[str, np.ndarray]] = []
    for lam in WAVELENGTHS:
        for ori in ORIENTATIONS:
            for phase in ("even", "odd"):
                out.append(
                    (
                        f"luminance edge {ori}deg {phase} l={lam:g}px",
                        gabor(ori, lam, phase)[..., None] * LUMINANCE,
                    )
                )
    for phase in ("odd", "even"):
        for ori in ORIENTATIONS:
            for name, colour in (("red-green", RED_GREEN), ("blue-yellow", BLUE_YELLOW)):
                out.append(
                    (
                        f"{name} edge {ori}deg {phase} l=6.5px",
                        gabor(ori, 6.5, phase)[..., None] * colour,
                    )
                )
    for hue in HUES:
        out.append((f"colour blob hue {hue}deg", blob(2.2)[..., None] * hue_direction(hue)))
    for sigma in (1.0, 1.6, 2.4):
        for sign, name in ((1.0, "on"), (-1.0, "off")):
            out.append(
                (
                    f"luminance {name}-centre s={sigma:g}px",
                    sign * centre_surround(sigma)[..., None] * LUMINANCE,
                )
            )
    for hue in HUES[::2]:
        out.append((f"large colour blob hue {hue}deg", blob(3.5)[..., None] * hue_direction(hue)))
    return out


def filter_labels() -> list[str]:
    """Return what each of the 96 filters detects, in filter order."""
    return [label for label, _ in _bank()]


def filter_bank() -> np.ndarray:
    """Return the filters as (96, SIZE, SIZE, 3) float32 OHWI, each of unit L2 norm."""
    w = np.stack([f for _, f in _bank()])
    w /= np.linalg.norm(w.reshape(len(w), -1), axis=1)[:, None, None, None]
    return w.astype(np.float32)
