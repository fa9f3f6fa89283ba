"""service.v2_jobs._after_answer: an /infer job's clean-up off the connection's path."""

from __future__ import annotations

import subprocess
import sys

from service.v2_jobs import _after_answer

PROBE = """
from gevent import monkey
monkey.patch_all()
import gevent
from service.v2_jobs import _after_answer
ran = []
_after_answer(ran.append, 1)
before = list(ran)
gevent.sleep(0.01)
print(before, ran)
"""


def test_under_gevent_the_clean_up_runs_in_its_own_greenlet():
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "[] [1]"  # not before the caller goes on; once it yields


def test_without_gevent_the_clean_up_runs_at_once():
    ran: list[int] = []
    _after_answer(ran.append, 1)
    assert ran == [1]
