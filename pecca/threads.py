"""How many threads the kernels use: the one place that decides."""
import os
import time

from pecca._kernels import runtime
from pecca.errors import InvalidArgumentError


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    for cpu in cpus:
        try:
            with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as f:
                cores.add(f.read().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def default_threads() -> int:
    """OMP_NUM_THREADS if set, else the physical cores; 1 when built without OpenMP."""
    if not runtime.openmp_enabled():
        return 1
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return physical_cores()


def resolve_threads(threads) -> int:
    if threads is None or threads == 0:
        return default_threads()
    if not isinstance(threads, int) or threads < 0:
        raise InvalidArgumentError(f"threads must be a positive integer, got {threads}")
    return threads if runtime.openmp_enabled() else 1


class ThreadGovernor:
    """Caps the kernels' threads at the cores that other processes leave free.

    With 2 threads on 2 cores, a neighbour on one core makes every parallel region wait at its
    barrier for the thread that now shares that core (and OpenMP's spinning makes it worse):
    2-thread decode fell to 1/20 of 1 thread's speed here. So every `interval` seconds this
    reads how much CPU the rest of the machine used (/proc/stat, less this process's own time
    from os.times; hypervisor steal counts as used) and, while others keep a core busy, hands
    out one thread fewer per busy core. Off Linux, or with PECCA_ADAPTIVE_THREADS=0, threads
    pass through unchanged.
    """

    BUSY = 0.4  # cores of others' use that count as a busy core (sampling noise is ~0.1)

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.enabled = os.environ.get("PECCA_ADAPTIVE_THREADS", "1") != "0"
        try:
            self.cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            self.cpus = os.cpu_count() or 1
        self.free = self.cpus
        self._last = None  # (monotonic time, machine busy seconds, own seconds)
        if self.enabled:  # a first reading now, so the first forward pass already has a window
            self._sample(time.monotonic())

    def threads(self, wanted: int) -> int:
        """The thread count to use now for a request of `wanted`."""
        if wanted <= 1 or not self.enabled:
            return wanted
        now = time.monotonic()
        if self._last is None or now - self._last[0] >= self.interval:
            self._sample(now)
        return max(1, min(wanted, self.free))

    def _sample(self, now: float) -> None:
        busy = machine_busy_seconds()
        if busy is None:
            self.enabled = False
            return
        t = os.times()
        own = t.user + t.system
        if self._last is not None:
            wall = now - self._last[0]
            others = max(0.0, (busy - self._last[1]) - (own - self._last[2])) / wall
            busy_cores = int(others + 1.0 - self.BUSY)  # 0.4 -> 1, 1.4 -> 2
            self.free = max(1, self.cpus - busy_cores)
        self._last = (now, busy, own)


def machine_busy_seconds():
    """CPU seconds the whole machine has been busy (all but idle and iowait; steal included),
    or None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


governor = ThreadGovernor()
