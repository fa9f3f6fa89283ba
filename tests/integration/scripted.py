"""A Model.run that begins layers on a script, to test how workers save a job's progress."""

from __future__ import annotations

import time

from rq.job import Job
from rq.serializers import JSONSerializer

from engine import Model


def scripted_run(monkeypatch, redis, job_ids, pause: float):
    """Make Model.run begin layers 1 and 2 back to back, pause, step, then really run.

    Returns the progress each job showed in Redis right after that step.
    """
    shown = []
    original = Model.run

    def run(self, images, *, outputs, on_layer, on_step, **kw):
        on_layer(0, 3, "a")
        on_layer(1, 3, "b")  # too soon after a's save: skipped here
        time.sleep(pause)
        on_step()  # inside layer b, past PROGRESS_SECONDS: b must be saved now
        shown.extend(
            Job.fetch(j, connection=redis, serializer=JSONSerializer).meta.get("progress")
            for j in job_ids
        )
        return original(self, images, outputs=outputs, **kw)

    monkeypatch.setattr(Model, "run", run)
    return shown
