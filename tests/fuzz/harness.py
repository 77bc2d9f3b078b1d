"""The parent side of the fuzz tests: a long-lived worker subprocess per reader (worker.py),
asked to load one mutated file at a time, with a timeout that catches hangs; the tally of
outcomes per reader that the terminal summary prints.

A worker that dies (a segfault, an abort) or hangs fails the example that was running, and
is started again for the next one: the failing file is named, and copied to a kept folder.
"""
import collections
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
TIMEOUT = float(os.environ.get("PECCA_FUZZ_TIMEOUT", 60))  # seconds per file: a hang
RSS_LIMIT_MB = 1500  # a reader must not allocate far beyond the file and the runtime buffers

# reader -> Counter of outcome labels ("ran (finite)", "refused: ModelFormatError", ...)
STATS = collections.defaultdict(collections.Counter)
TIMES = collections.defaultdict(float)
# the long run records failures and goes on (the session then fails): signature -> [count, report]
FAILURES = {}


def fuzz_examples() -> int:
    """Mutated files per reader: PECCA_FUZZ_N (pytest --fuzz-long sets it), else 500."""
    return int(os.environ.get("PECCA_FUZZ_N") or 500)


def long_run() -> bool:
    return bool(os.environ.get("PECCA_FUZZ_N"))


class Worker:
    def __init__(self, name: str, logdir: Path):
        self.name, self.log = name, logdir / f"worker-{name}.log"
        self.proc = None
        self.buf = b""

    def start(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
        self.proc = subprocess.Popen([sys.executable, str(WORKER)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=open(self.log, "ab"), env=env,
                                     cwd=REPO_ROOT)
        self.buf = b""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def ask(self, request: dict) -> dict:
        """The worker's answer for one request; {"outcome": "died"/"hang", ...} when it did not
        answer (it is restarted for the next request)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        t0 = time.perf_counter()
        try:
            self.proc.stdin.write((json.dumps(request) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._dead()
        line = self._read_line(TIMEOUT)
        TIMES[self.name] += time.perf_counter() - t0
        if line is None:
            if self.proc.poll() is None:  # still running: a hang
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                return {"outcome": "hang", "message": f"no answer in {TIMEOUT:.0f} s"}
            return self._dead()
        return json.loads(line)

    def _dead(self) -> dict:
        rc = self.proc.wait()
        self.proc = None
        what = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        tail = self.log.read_bytes()[-2000:].decode(errors="replace") if self.log.exists() else ""
        return {"outcome": "died", "message": f"the worker died ({what}); its stderr ends:\n{tail}"}

    def _read_line(self, timeout):
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def label(result: dict) -> str:
    if result["outcome"] == "ran":
        return "ran, finite logits" if result.get("finite") else "ran, non-finite logits"
    if result["outcome"] == "refused":
        return f"refused ({result['stage']}): {result['error']}"
    return f"FAILED: {result['outcome']} {result.get('error', '')}".strip()


def signature(reader: str, result: dict) -> str:
    """What tells failures apart: the reader, the outcome, the exception and the innermost
    line of pecca (or export) it came from."""
    where = ""
    for line in result.get("traceback", "").splitlines():
        if line.strip().startswith("File") and ("/pecca/" in line or "/export/" in line):
            where = line.strip()
    return f"{reader}: {label(result)} {where}"


class Fuzzer:
    """One reader's worker and scratch folder; `load(path)` asks the worker and asserts."""

    def __init__(self, reader: str, root: Path):
        self.reader = reader
        self.root = root
        self.kept = root / "failures"
        self.worker = Worker(reader, root)
        self.n = 0

    def scratch(self) -> Path:
        """A fresh folder for one mutated case."""
        self.n += 1
        d = self.root / f"case{self.n}"
        d.mkdir()
        return d

    def load(self, case_dir: Path, path, tokenizer=None, export=False):
        request = {"path": str(path), "tokenizer": None if tokenizer is None else str(tokenizer),
                   "export": export, "threads": 2 if self.n % 4 == 0 else 1}  # both kernel paths
        result = self.worker.ask(request)
        STATS[self.reader][label(result)] += 1
        if os.environ.get("PECCA_FUZZ_LOG"):  # every outcome, for a look at what the readers said
            with open(os.environ["PECCA_FUZZ_LOG"], "a") as f:
                f.write(json.dumps({"reader": self.reader, **result}) + "\n")
        ok = result["outcome"] in ("ran", "refused") and result.get("stage") != "run"
        if ok and result["outcome"] == "refused" and str(case_dir) not in result["message"]:
            ok, result["outcome"] = False, "unnamed"  # a refusal must say which file it is about
        if ok and result.get("rss_mb", 0) > RSS_LIMIT_MB:
            ok, result["message"] = False, f"the worker's peak RSS reached {result['rss_mb']} MB"
            result["outcome"] = "memory"
            self.worker.stop()  # a fresh worker: the peak is per process
        if not ok:
            kept = self.kept / case_dir.name
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(case_dir, kept)
            shutil.rmtree(case_dir, ignore_errors=True)
            report = (f"{self.reader}: {path} (kept in {kept}): {label(result)}\n"
                      f"{result.get('message', '')}\n{result.get('traceback', '')}")
            if not long_run():
                raise AssertionError(report)
            sig = signature(self.reader, result)
            FAILURES.setdefault(sig, [0, report])[0] += 1
        shutil.rmtree(case_dir, ignore_errors=True)
        return result


def fuzz_settings():
    """Hypothesis settings of every fuzz test: fuzz_examples() examples, no deadline (a load
    takes what it takes; the worker's timeout catches hangs); in CI a fixed seed, so a run
    is repeatable; the long run draws new cases each time."""
    from hypothesis import HealthCheck, Phase, settings

    return settings(max_examples=fuzz_examples(), deadline=None, database=None, derandomize=not long_run(),
                    suppress_health_check=list(HealthCheck), phases=[Phase.generate, Phase.shrink],
                    print_blob=False)


class Quiet(dict):
    """A dict of seeds that hypothesis's falsifying-example report prints in one word."""

    def __repr__(self):
        return f"<{len(self)} seeds>"
