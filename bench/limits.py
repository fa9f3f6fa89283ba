"""Cost of requests the limits refuse: wall time and peak-RSS growth of the API per request.

    python bench/limits.py [--rounds 5]

Each probe goes through the Flask test client over fakeredis (no worker), so the figures are the
API process's own: what a refused request costs before its 4xx.
- pngs: 8 all-black 4096x4096 PNGs (~390 KB sent) to an open-size model, outputs=all;
- hint: a strict-fit spec of four stride-65535 pools on a 3000x65536 input (the misfit hint);
- pad: a 67-byte PNG into a conv of pad 500 and 64 filters (its run's peak working memory).
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.errors import EngineError  # noqa: E402
from engine.spec import parse_spec  # noqa: E402
from tests.integration.apikit import SPEC, Api, npz_bytes  # noqa: E402


def _png(side: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe_pngs(api: Api, png: bytes) -> int:
    files = [(io.BytesIO(png), f"{i}.png") for i in range(8)]
    rv = api.client.post(
        "/v2/models/open/jobs",
        data={"images": files, "outputs": "all"},
        content_type="multipart/form-data",
    )
    return rv.status_code


def probe_hint(_api: Api, _png: bytes) -> int:
    layers = [{"name": f"p{i}", "type": "maxpool", "size": 1, "stride": 65535} for i in range(4)]
    try:
        parse_spec(
            {
                "name": "m",
                "input": {"height": 3000, "width": 65536, "channels": 1},
                "layers": layers,
            }
        )
    except EngineError:
        return 400
    return 200


def probe_pad(api: Api, _png: bytes) -> int:
    rv = api.client.post(
        "/v2/models/pad/jobs",
        data={"images": [(io.BytesIO(TINY), "a.png")]},
        content_type="multipart/form-data",
    )
    return rv.status_code


TINY = _png(1, "L")
PAD_SPEC = {
    "name": "pad",
    "input": {"channels": 1},
    "fit": "floor",
    "layers": [
        {"name": "a", "type": "conv", "filters": 64, "size": 1, "pad": 500},
        {"name": "b", "type": "conv", "filters": 1, "size": 1},
    ],
}
PAD_ARRAYS = {
    "a.w": np.ones((64, 1, 1, 1), np.float32),
    "a.b": np.zeros(64, np.float32),
    "b.w": np.zeros((1, 1, 1, 64), np.float32),
    "b.b": np.zeros(1, np.float32),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    api = Api(MAX_RUN_BYTES=128 << 20)
    assert (
        api.load("open", spec={**SPEC, "input": {"channels": 3}, "fit": "floor"}).status_code == 200
    )
    assert api.load("pad", spec=PAD_SPEC, data=npz_bytes(PAD_ARRAYS)).status_code == 200
    png = _png(4096)
    print("probe  status  median ms  peak RSS growth MiB (first round)")
    for name, probe in (("pngs", probe_pngs), ("hint", probe_hint), ("pad", probe_pad)):
        times, growth, status = [], None, None
        for _ in range(args.rounds):
            before = _maxrss()
            began = time.perf_counter()
            status = probe(api, png)
            times.append(time.perf_counter() - began)
            growth = (_maxrss() - before) / 2**20 if growth is None else growth
        print(f"{name:5}  {status}     {statistics.median(times) * 1000:9.1f}  {growth:.1f}")


if __name__ == "__main__":
    main()
