"""Draw pictures of activation maps (the grid itself is drawn in worker.contract.pictures)."""

from __future__ import annotations

from worker.contract.pictures import grid, grid_png, rgb_png

__all__ = ["grid", "grid_png", "rgb_png"]
