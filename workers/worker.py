"""A consumer-group worker: dynamic batches across cameras, one backbone pass and one search per bank.

Thread rules: three stages, each on its own thread and owning its own objects: the loop (this Worker, its Reader
and Holds, the report), the scoring thread (ScoreStage, its BankCache), the writer thread (Writer). They exchange
frozen values only (workers/outcomes.py) through queues: loop -> scorer -> writer, and events back to the loop, which
alone keeps the held/sick/retry/proven state. No attribute is written by two threads: tests/test_worker_threads.py
records every attribute write of every stage object while a real worker runs, holds and recovers.

A frame is acknowledged (and deleted from its stream) in the same transaction that writes its
result, so a crash loses nothing: unacknowledged frames of a dead worker are reclaimed after
`claim_idle_ms`. Frames that cannot be accepted (malformed, undecodable, an image header that
disagrees with the frame) go to the dead-letter stream. Infrastructure faults (no loadable
bank, a host that cannot score: memory, device, files; Redis refusing writes) never do: the frames
stay pending, held by this worker and retried with backoff (workers/holds.py). A batch whose scoring raises
anything else is split in halves until the frames that raise alone are found (workers/scoring.py); those are
left pending, and a frame delivered more than `max_deliveries` times (XPENDING's count: each reclaim,
including after a worker died on it) is dead-lettered as poison.

Pipelining (`prefetch`, on by default): while one batch is scored and the previous batch's results are written,
the loop reads the next batch from Redis and decodes it (JPEGs together, on the GPU when the worker scores there),
from the first batch that has its outcomes with nothing held on (until then, and after any hold, the next batch
is read only once the one in flight is written). At most one batch is scored and one written at a time, results
in batch order; both are finished before held frames are retried, streams refreshed or frames reclaimed,
and before the worker stops. A frame is still acknowledged only by the script that writes its outcome.
"""
from __future__ import annotations

import logging
import queue
import threading
import time

import redis

from contracts.keys import Keys
from runtime.metrics import BATCH_SIZE
from runtime.streams import REDIS_ERRORS, serve
from workers.holds import Holds
from workers.outcomes import Batch, Entry, Event, Failed, Handed, Preload, Written
from workers.reader import Reader
from workers.scoring import ScoreStage
from workers.settings import WorkerReport, WorkerSettings
from workers.writer import Writer

__all__ = ["Worker", "WorkerSettings", "WorkerReport"]

log = logging.getLogger("patchcore.worker")

_STOP = object()  # through the queues: the stage ends


class Worker:
    def __init__(self, client: redis.Redis, settings: WorkerSettings = WorkerSettings(), keys: Keys = Keys(),
                 stop: threading.Event | None = None):
        self.client = client
        self.settings = settings
        self.keys = keys
        self.stop = stop or threading.Event()
        self.report = WorkerReport()
        self.reader = Reader(client, settings, keys, self.stop)
        self.holds = Holds(client, settings, keys)
        self.scorer = ScoreStage(client, settings, keys)
        self.writer = Writer(client, settings, keys)
        self.banks = self.scorer.banks  # callers may load a bank before run() (patchcore up warms it up)
        self._to_score: queue.Queue = queue.Queue(maxsize=1)  # a Batch or Preload, put only when the scorer is free
        self._to_write: queue.Queue = queue.Queue(maxsize=1)  # Outcomes, put once the previous ones are written
        self._events: queue.Queue[Event] = queue.Queue()  # Handed, Written, Failed: to the loop
        self._threads: list[threading.Thread] = []
        self._scoring = False  # a Batch or Preload is with the scorer (no Handed or Failed for it yet)
        self._unwritten = 0  # batches sent to the scorer without their Written (or Failed) yet
        self._failure: BaseException | None = None  # a stage's error, raised in the loop at the next wait
        self._proven = False  # the last batch got its outcomes with nothing held: prefetching may go on

    # ---- the loop -------------------------------------------------------------------------------
    def run(self) -> WorkerReport:
        self._threads = [threading.Thread(target=_scoring, args=(self.scorer, self._to_score, self._to_write, self._events),
                                          name=f"score-{self.settings.name}", daemon=True),
                         threading.Thread(target=_writing, args=(self.writer, self._to_write, self._events),
                                          name=f"write-{self.settings.name}", daemon=True)]
        for thread in self._threads:
            thread.start()
        try:
            serve(self._step, self.stop, log, self.settings.name, on_lost_group=self._lost_group)
            self._drain()  # the batch in flight gets its outcomes before the worker stops
        except REDIS_ERRORS as exc:  # its frames stay pending: another worker reclaims them
            log.warning("stopped with a batch unwritten", extra={"fields": {"error": str(exc)}})
        finally:
            self._to_score.put(_STOP)  # the scorer finishes its batch and hands it on; the writer writes it
            for thread in self._threads:
                thread.join()
            self._threads = []
            while self._absorb(block=False):
                pass
            if self._failure is not None:  # its frames stay pending: another worker reclaims them
                log.warning("stopped with a batch unwritten", extra={"fields": {"error": str(self._failure)}})
        return self.report

    def _step(self) -> None:
        try:
            self._step_once()
        except BaseException:
            self.reader.streams.reread()  # frames of a failed stage may be pending to this worker: read them first
            raise

    def _step_once(self) -> None:
        self._maybe_refresh()
        if self.holds.due():
            self._drain()  # batches in flight may hold more frames
            if self.holds.due():
                retry = self.holds.take()
                for begin in range(0, len(retry), self.settings.max_batch):
                    self._through(retry[begin:begin + self.settings.max_batch])
                self.holds.backoff()
        if not self._proven:
            # until a batch has gone through cleanly (at the start, after any hold), read the next batch only
            # once the one in flight has its outcomes: a worker that turns out sick or bankless has taken one
            # batch, not two
            self._drain()
        batch = self._collect()
        if not batch:
            return
        if not self.settings.prefetch:
            self._through(batch)
            return
        prepared = self._prepare(batch)  # while the previous batch is scored (and the one before written)
        self._wait_scorer()  # its results may still be written while this batch is scored
        self._send(prepared)
        self._check()

    def _lost_group(self) -> None:
        """NOGROUP: the stream or its group is gone (data loss); re-create groups, drop what we hold."""
        self.reader.forget()
        self.holds.forget()

    def _maybe_refresh(self) -> None:
        # a worker that reads no stream yet looks for cameras at every idle tick (0.1 s), not every refresh_s:
        # the first camera's first frames do not wait up to refresh_s to be seen
        if not self.reader.streams.due() and self.reader.streams.names:
            return
        self._drain()
        self.reader.streams.refresh()
        self.client.hset(self.keys.workers, self.settings.name, time.time())
        if self._threads:  # every active bank, before its first frame: readiness means "can score"
            self._send(Preload())
            self._wait_scorer()
            self._check()
        else:
            self.scorer.preload()
        self.holds.keep()
        if not self.holds.sick:
            self.report.reclaimed += self.reader.reclaim()

    def _collect(self) -> list[Entry]:
        """The next batch (Reader.collect), from the streams this worker may read now. When its own pending frames
        are to be read first (runtime.streams.CameraStreams: at start, after a new connection, a failed step), the
        batches in flight are written first: the frames pending to this worker that it neither holds nor has
        waiting are then those delivered to it and never seen (a lost read reply) or left by a failed stage."""
        if self.reader.streams.recovery_due(self.holds.readable(self.reader.streams.names)):
            self._drain()
        before = self.reader.streams.recovered
        batch = self.reader.collect(self.holds.readable(self.reader.streams.names), self._scorer_busy,
                                    self.holds.entries)
        self.report.recovered += self.reader.streams.recovered - before
        return batch

    def _prepare(self, batch: list[Entry]) -> Batch:
        self.report.batches += 1
        self.report.frames += len(batch)
        BATCH_SIZE.observe(len(batch))
        return self.reader.prepare(batch)

    # ---- the stages in flight -------------------------------------------------------------------
    def _send(self, item: Batch | Preload) -> None:
        """To the scoring thread, which is free (each caller waited for it)."""
        self._to_score.put(item)
        self._scoring = True
        self._unwritten += isinstance(item, Batch)

    def _through(self, batch: list[Entry]) -> None:
        """One batch through the stages, written before this returns."""
        self._drain()
        self._send(self._prepare(batch))
        self._drain()

    def _wait_scorer(self) -> None:
        while self._scoring:
            self._absorb(block=True)

    def _drain(self) -> None:
        """Wait for every batch sent to be scored and written; a stage's exception (e.g. NOGROUP) is raised here."""
        while self._unwritten or self._scoring:
            self._absorb(block=True)
        self._check()

    def _scorer_busy(self) -> bool:
        while self._absorb(block=False):
            pass
        return self._scoring

    def _check(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _absorb(self, block: bool) -> bool:
        """Take one event of the scorer or writer (waiting for it if `block`); False if there was none."""
        try:
            event = self._events.get(block=block)
        except queue.Empty:
            return False
        if isinstance(event, Written):
            self._unwritten -= 1
            self._apply(event)
        elif isinstance(event, Handed):
            self._scoring = False
        else:
            assert isinstance(event, Failed)
            if event.stage != "write":
                self._scoring = False
            if event.stage != "preload":
                self._unwritten -= 1
            if self._failure is None:
                self._failure = event.error
            else:
                log.error("stage failed", extra={"fields": {"stage": event.stage, "error": repr(event.error)}})
        return True

    def _apply(self, written: Written) -> None:
        self.report.results += written.results
        self.report.deadlettered += written.deadlettered
        self.report.suspects += written.suspects
        self.report.held += len(written.held)
        self.holds.add(written.held)
        self._proven = not written.held

    # ---- for a worker that is not running -------------------------------------------------------
    def process(self, batch: list[Entry]) -> None:
        """Give each frame of the batch its outcome, or hold it (infrastructure) or leave it pending (suspect):
        every stage on the calling thread, for a worker whose run() is not running."""
        self._apply(self.writer.write(self.scorer.score(self._prepare(batch))))

    def readiness(self) -> tuple[bool, dict]:
        """Ready (/readyz): a bank loaded and the workers' group joined on at least one camera stream."""
        banks, streams = self.scorer.banks.loaded(), len(self.reader.streams.names)
        return bool(banks) and streams > 0, {"banks": banks, "frame_streams": streams}


def _scoring(stage: ScoreStage, inbox: queue.Queue, outbox: queue.Queue, events: queue.Queue) -> None:
    """The scoring thread: score each batch, then hand it to the writer once the previous one is written."""
    while (item := inbox.get()) is not _STOP:
        try:
            if isinstance(item, Preload):
                stage.preload()
                events.put(Handed())
                continue
            outcomes = stage.score(item)
        except Exception as exc:  # noqa: BLE001 - the loop raises it (a Redis fault, NOGROUP, or a bug)
            events.put(Failed("preload" if isinstance(item, Preload) else "score", exc))
            continue
        outbox.join()  # one batch being written at a time, in order
        outbox.put(outcomes)
        events.put(Handed())
    outbox.join()
    outbox.put(_STOP)


def _writing(stage: Writer, inbox: queue.Queue, events: queue.Queue) -> None:
    """The writer thread: write each batch's outcomes; report them (Written) before taking the next."""
    while (item := inbox.get()) is not _STOP:
        try:
            events.put(stage.write(item))
        except Exception as exc:  # noqa: BLE001 - the loop raises it
            events.put(Failed("write", exc))
        finally:
            inbox.task_done()
    inbox.task_done()
