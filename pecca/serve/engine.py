"""The serving engine: continuous batching in one background thread.

Requests (`Job`s) wait in a queue; each engine step
  1. drops the jobs whose clients went away (their slots are free at once),
  2. gives free KV-cache slots to waiting jobs,
  3. feeds one chunk (up to Model.PREFILL_BATCH tokens) of each new job's prompt into its slot,
  4. feeds one token for every job that is decoding, all in one batched pass (BatchDecoder),
and samples each job's next token with its own Sampler. A job leaves at a stop token
(EOS/end of turn), a stop string, max_tokens or the end of its context.

Each job follows `pecca.generate.generate_ids` and `stream_text` step for step (same positions,
same repetition-penalty history, same UTF-8-safe text and stop-string cutting), so what a
request gets is what `LLM.generate` gives for the same prompt and options.

The engine talks to the outside through each job's `sink`, a callable it calls from its thread
with ("text", str), then ("done", finish_reason, Usage) or ("error", message). A step's events
are handed over together at its end: the HTTP thread, woken by the first, would otherwise take
the GIL from the engine between two rows' sampling.

Every kernel call of the engine runs on its one thread, from the BatchDecoder's start-up checks
on: libgomp gives each thread that starts parallel regions a pool of worker threads of its own,
and once a process has more such threads than CPUs it cuts its spin-wait to ~100 iterations, so
that each of a step's ~250 parallel regions wakes a sleeping worker through the kernel. On 2
cores a second pool (the decoder built on the HTTP thread, say) took a SmolLM2-135M step from
3.4 to 15 ms.
"""
import codecs
import itertools
import threading
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from pecca.errors import PeccaError
from pecca.generate import StopStrings
from pecca.model import Model
from pecca.sampling import Sampler
from pecca.serve.batch import BatchDecoder, SlotPool

DEFAULT_CTX = 4096  # a model's own context can be 128K positions: too much KV cache per slot


class QueueFullError(PeccaError):
    """Every slot is busy and the waiting queue is full (HTTP 503)."""


class EngineClosedError(PeccaError):
    """The engine was shut down."""


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


class TextStream:
    """stream_text one token at a time: UTF-8-safe pieces, cut at the first stop string."""

    def __init__(self, tokenizer, prev: int, stop):
        self.tokenizer, self.prev = tokenizer, prev
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.stops = StopStrings(stop)

    def push(self, token: int):
        """(text safe to show, whether a stop string was found)"""
        text = self.decoder.decode(self.tokenizer.token_bytes(self.prev, token))
        self.prev = token
        return self.stops.push(text)

    def finish(self):
        text, found = self.stops.push(self.decoder.decode(b"", final=True))
        return (text if found else text + self.stops.flush()), found


_ids = itertools.count(1)


@dataclass(eq=False)
class Job:
    """One request: its prompt, sampler and limits, and its progress in the engine."""
    prompt_ids: List[int]
    sampler: Sampler
    max_tokens: int
    stop: List[str]
    sink: Callable[[tuple], None]
    id: int = field(default_factory=lambda: next(_ids))
    slot: Optional[int] = None
    fed: int = 0  # prompt tokens already in the slot
    pos: int = 0  # where `token` is fed next
    token: int = -1
    generated: int = 0
    previous: List[int] = field(default_factory=list)  # for the repetition penalty
    text: Optional[TextStream] = None
    cancelled: bool = False
    done: bool = False

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.prompt_ids) and not self.done


class Engine:
    """Continuous batching over `parallel` KV-cache slots of `ctx_size` positions.

    llm: a pecca.LLM (its weights, tokenizer and threads are used; its own KV cache is not).
    max_queue: jobs that may wait for a slot; past that, submit raises QueueFullError.
    """

    def __init__(self, llm, parallel: int = 4, ctx_size: Optional[int] = None, max_queue: Optional[int] = None):
        if not isinstance(parallel, int) or parallel < 1:
            raise PeccaError(f"parallel must be an integer >= 1, got {parallel}")
        c = llm.config
        self.ctx = min(c.seq_len, DEFAULT_CTX) if not ctx_size else int(ctx_size)
        if not 0 < self.ctx <= c.seq_len:
            raise PeccaError(f"ctx_size {self.ctx} must be in 1..{c.seq_len} (the model's context)")
        self.parallel = parallel
        self.max_queue = 4 * parallel if max_queue is None else int(max_queue)
        self.tokenizer, self.stop_ids, self.vocab_size = llm.tokenizer, llm.stop_ids, c.vocab_size
        self.pool = SlotPool(c, llm.model.weights, parallel, self.ctx, llm.threads, llm.model.kv_type)
        self.decoder: Optional[BatchDecoder] = None  # built by the engine thread (see the top)
        self.start_error: Optional[BaseException] = None
        self.waiting: deque = deque()
        self.active: List[Job] = []
        self.in_flight = 0  # submitted and not yet ended
        self.counts = {"finished": 0, "cancelled": 0, "failed": 0, "steps": 0}
        self.lock = threading.Lock()  # guards waiting, in_flight, counts
        self.wake = threading.Condition(self.lock)
        self.step_lock = threading.Lock()  # held during each step (see pause)
        self.closed = False
        self.thread: Optional[threading.Thread] = None
        self.outbox: List[tuple] = []  # (sink, event) of this step, handed over at its end

    # ---- the outside (any thread) ---------------------------------------------------------

    def start(self) -> "Engine":
        """Start the engine thread; returns once its BatchDecoder is ready (raises what
        building it raised)."""
        if self.thread is None:
            ready = threading.Event()
            self.thread = threading.Thread(target=self._run, args=(ready,), name="pecca-engine", daemon=True)
            self.thread.start()
            ready.wait()
        if self.start_error is not None:
            raise self.start_error
        return self

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.wake.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, job: Job) -> Job:
        with self.lock:
            if self.closed:
                raise EngineClosedError("the server is shutting down")
            if self.in_flight >= self.parallel + self.max_queue:
                raise QueueFullError(f"all {self.parallel} slots are busy and {len(self.waiting)} requests "
                                     "are waiting; try again later")
            self.in_flight += 1
            self.waiting.append(job)
            self.wake.notify()
        return job

    def cancel(self, job: Job) -> None:
        """The client went away: the job ends before the next step, its slot freed."""
        with self.lock:
            if not job.done:
                job.cancelled = True
                self.wake.notify()

    def status(self) -> dict:
        with self.lock:
            return {"slots": self.parallel, "slots_busy": self.parallel - len(self.pool.free),
                    "waiting": len(self.waiting), "in_flight": self.in_flight, "ctx_size": self.ctx,
                    "max_queue": self.max_queue, **self.counts}

    @contextmanager
    def pause(self):
        """Hold the engine between two steps (tests use it to line requests up)."""
        with self.step_lock:
            yield

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        try:
            self.decoder = BatchDecoder(self.pool, self.parallel)
        except BaseException as e:
            self.start_error = e
            with self.lock:
                self.closed = True
        finally:
            ready.set()
        while True:
            with self.lock:
                while not self.closed and not self.waiting and not self.active:
                    self.wake.wait()
                if self.closed:
                    break
            with self.step_lock:
                try:
                    self._step()
                except Exception as e:  # a broken step fails its jobs, never the engine
                    for job in list(self.active):
                        self._fail(job, e)
                self._deliver()
        for job in list(self.active) + list(self.waiting):
            self._fail(job, EngineClosedError("the server is shutting down"))
        self._deliver()

    def _emit(self, job: Job, event: tuple) -> None:
        self.outbox.append((job.sink, event))

    def _deliver(self) -> None:
        out, self.outbox = self.outbox, []
        for sink, event in out:
            try:
                sink(event)
            except Exception:  # a sink that fails loses its own events, nobody else's
                pass

    def _step(self) -> None:
        self._admit()
        for job in [j for j in self.active if not j.decoding]:
            self._prefill_chunk(job)
        rows = [j for j in self.active if j.decoding]
        if rows:
            logits = self.decoder.step([(j.slot, j.token, j.pos) for j in rows])
            for j, row in zip(rows, logits):
                self._guarded(j, row)
        self.counts["steps"] += 1

    def _admit(self) -> None:
        """Drop cancelled jobs, then give free slots to waiting ones."""
        with self.lock:
            for job in [j for j in self.active if j.cancelled]:
                self._end(job, "cancelled")
            for job in [j for j in self.waiting if j.cancelled]:
                self.waiting.remove(job)
                self._end(job, "cancelled")
            while self.waiting and self.pool.free:
                job = self.waiting.popleft()
                if job.max_tokens == 0:  # as generate_ids: nothing to do, not even the prefill
                    self._send_done(job, "length")
                    self._end(job)
                    continue
                job.slot = self.pool.take()
                job.previous = list(job.prompt_ids)
                job.text = TextStream(self.tokenizer, job.prompt_ids[-1], job.stop)
                self.active.append(job)

    def _prefill_chunk(self, job: Job) -> None:
        n, B = len(job.prompt_ids), Model.PREFILL_BATCH
        chunk = job.prompt_ids[job.fed:job.fed + B]
        try:
            logits = self.pool.prefill(job.slot, chunk, job.fed, n)
        except Exception as e:
            self._fail(job, e)
            return
        job.fed += len(chunk)
        if job.fed == n:
            job.pos = n - 1
            self._guarded(job, logits)

    def _guarded(self, job: Job, logits) -> None:
        try:
            self._next_token(job, logits)
        except Exception as e:  # a sampler error (non-finite logits) ends this job only
            self._fail(job, e)

    def _next_token(self, job: Job, logits) -> None:
        """generate_ids' loop body: sample, stop token, text and stop strings, limits."""
        token = job.sampler.sample(logits, job.previous)
        if token in self.stop_ids:
            return self._finish(job, "stop")
        job.generated += 1
        job.previous.append(token)
        text, found = job.text.push(token)
        if text:
            self._emit(job, ("text", text))
        if found:
            return self._finish(job, "stop", flushed=True)
        if job.generated >= job.max_tokens:
            return self._finish(job, "length")
        job.pos += 1
        if job.pos >= self.ctx:
            return self._finish(job, "length")
        job.token = token

    def _finish(self, job: Job, reason: str, flushed: bool = False) -> None:
        if not flushed:
            text, found = job.text.finish()
            if text:
                self._emit(job, ("text", text))
            reason = "stop" if found else reason
        self._send_done(job, reason)
        with self.lock:
            self._end(job)

    def _send_done(self, job: Job, reason: str) -> None:
        self._emit(job, ("done", reason, Usage(len(job.prompt_ids), job.generated)))

    def _fail(self, job: Job, error: Exception) -> None:
        msg = str(error) if isinstance(error, PeccaError) else f"{type(error).__name__}: {error}"
        self._emit(job, ("error", msg))
        with self.lock:
            self._end(job, "failed")

    def _end(self, job: Job, how: str = "finished") -> None:
        """Take a job out and free its slot (the caller holds self.lock); `how` is counted."""
        if job.done:
            return
        job.done = True
        if job in self.active:
            self.active.remove(job)
        if job in self.waiting:
            self.waiting.remove(job)
        if job.slot is not None:
            self.pool.give_back(job.slot)
            job.slot = None
        self.in_flight -= 1
        self.counts[how] += 1
