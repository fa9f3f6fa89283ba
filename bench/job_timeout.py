"""How near its timeout a job inside one long layer stops, on the thread worker of `convq up`.

    python bench/job_timeout.py [--timeout 10] [--channels 256] [--pad 300]

One float image 8x8xC through one conv (64 filters of 11x11, pad P): mostly padding, so the
layer is long (~7e11 multiply-adds at the defaults) while its input and output stay small.
The job runs on a ConvqThreadWorker over fakeredis (no signals, as in `convq up`); prints when
it ended and how, beside the timeout it was given.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fakeredis  # noqa: E402
import numpy as np  # noqa: E402

from engine import Model  # noqa: E402
from worker.contract.config import Settings  # noqa: E402
from worker.contract.queue import job_status, make_queue, submit  # noqa: E402
from worker.contract.store import Store  # noqa: E402
from worker.runner import burst  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=int, default=10, help="job timeout in seconds")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--pad", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    redis = fakeredis.FakeRedis()
    settings = Settings(threads=args.threads)
    store = Store.from_settings(redis, settings)
    queue = make_queue(redis)
    c = args.channels
    spec = {
        "name": "long",
        "input": {"channels": c},
        "fit": "floor",
        "layers": [{"name": "c", "type": "conv", "filters": 64, "size": 11, "pad": args.pad}],
    }
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((64, 11, 11, c)).astype(np.float32)
    model = Model.from_arrays(spec, {"c.w": weights, "c.b": np.zeros(64, np.float32)})
    version = store.put_model("long", model.spec, model.to_safetensors(), owner=None)
    image = rng.standard_normal((1, 8, 8, c)).astype(np.float32)
    job_id = submit(
        queue,
        store,
        model="long",
        version=version,
        images=image,
        outputs=["c"],
        owner=None,
        job_timeout=args.timeout,
    )
    began = time.monotonic()
    burst(redis, settings)
    took = time.monotonic() - began
    status = job_status(queue, job_id) or {}
    compute = (status.get("timings") or {}).get("compute_seconds")
    print(
        f"timeout {args.timeout} s: job {status.get('status')} after {compute or 0:.2f} s of "
        f"compute ({took:.1f} s with the worker's start); {status.get('error') or 'no error'}"
    )


if __name__ == "__main__":
    main()
