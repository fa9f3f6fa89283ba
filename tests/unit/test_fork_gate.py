"""The dispatcher's fork gate: a fork waits for the host name lookups under way."""

from __future__ import annotations

import os
import threading
import time

import pytest

from worker.dispatcher import _RESOLVING


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_fork_waits_for_the_lookup_under_way_and_the_child_can_look_up():
    inside = threading.Event()
    left = []

    def lookup():
        with _RESOLVING:
            inside.set()
            time.sleep(0.3)
            left.append(time.monotonic())

    thread = threading.Thread(target=lookup)
    thread.start()
    inside.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: the gate must not be left taken
        with _RESOLVING:
            pass
        os._exit(0)
    forked = time.monotonic()
    deadline = forked + 10
    while (found := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if found[0] == 0:  # the child hangs on the gate
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child found the gate taken")
    status = found[1]
    thread.join(5)
    assert left and left[0] <= forked  # the fork happened only after the lookup ended
    assert os.waitstatus_to_exitcode(status) == 0
    with _RESOLVING:  # and the parent's gate is open again
        pass
