"""How many threads the kernels use: the one place that decides."""
import os

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
