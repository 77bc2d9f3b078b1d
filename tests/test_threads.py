"""ThreadGovernor: fewer kernel threads while other processes keep cores busy."""
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from pecca import threads as threads_module
from pecca.threads import ThreadGovernor


class FakeClock:
    """Machine busy seconds and this process's own seconds, advanced by hand."""

    def __init__(self, monkeypatch):
        self.now, self.busy, self.own = 100.0, 0.0, 0.0
        monkeypatch.setattr(threads_module.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(threads_module, "machine_busy_seconds", lambda: self.busy)
        monkeypatch.setattr(threads_module.os, "times",
                            lambda: SimpleNamespace(user=self.own, system=0.0))

    def advance(self, wall, others, own):
        """`wall` seconds pass; other processes use `others` cores, this one `own` cores."""
        self.now += wall
        self.busy += (others + own) * wall
        self.own += own * wall


@pytest.mark.parametrize("others,cpus,free", [(0.0, 2, 2), (0.3, 2, 2), (0.5, 2, 1), (1.0, 2, 1),
                                              (2.0, 2, 1), (1.5, 8, 6), (0.1, 8, 8)])
def test_free_cores_follow_other_processes(monkeypatch, others, cpus, free):
    clock = FakeClock(monkeypatch)
    g = ThreadGovernor(interval=0.2)
    g.enabled, g.cpus, g.free = True, cpus, cpus
    assert g.threads(cpus) == cpus  # first reading: nothing to compare with yet
    clock.advance(0.25, others, own=min(cpus, 2))  # our own threads never count against us
    assert g.threads(cpus) == free
    assert g.threads(1) == 1
    clock.advance(0.25, 0.0, own=1.0)  # the neighbour stops: back to every core
    assert g.threads(cpus) == cpus


def test_reads_only_once_per_interval(monkeypatch):
    clock = FakeClock(monkeypatch)
    g = ThreadGovernor(interval=0.2)
    g.enabled, g.cpus, g.free = True, 2, 2
    g.threads(2)
    clock.advance(0.1, 2.0, 0.0)
    assert g.threads(2) == 2  # within the interval: the old reading stands
    clock.advance(0.15, 2.0, 0.0)
    assert g.threads(2) == 1


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PECCA_ADAPTIVE_THREADS", "0")
    clock = FakeClock(monkeypatch)
    g = ThreadGovernor()
    g.cpus = 2
    g.threads(2)
    clock.advance(1.0, 2.0, 0.0)
    assert g.threads(2) == 2


def test_without_proc_stat_threads_pass_through(monkeypatch):
    monkeypatch.setattr(threads_module, "machine_busy_seconds", lambda: None)
    g = ThreadGovernor()
    assert g.threads(2) == 2 and g.threads(7) == 7


@pytest.mark.skipif(not os.path.exists("/proc/stat") or len(os.sched_getaffinity(0)) != 2,
                    reason="needs Linux /proc/stat and exactly 2 usable cores (this machine kind)")
def test_a_real_busy_neighbour_takes_a_thread():
    g = ThreadGovernor(interval=0.2)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        g.threads(2)
        time.sleep(0.5)
        assert g.threads(2) == 1
    finally:
        hog.kill()
        hog.wait()
