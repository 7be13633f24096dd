"""The worker's thread rule (workers/worker.py): each stage object is written by one thread only. A real pipelined
worker runs against a real Redis through a hold (no loadable bank: frames held, the fault shown, retried), its
recovery and a normal pipelined run, while every attribute assignment of every stage object, and every in-place
change of a list, dict or set they hold, is recorded with the thread that made it."""
import threading
from collections import defaultdict

from runtime.connection import connect
from contracts.keys import FRAME_GROUP
from workers.banks.registry import BankRegistry
from workers.worker import Worker, WorkerSettings

from .test_pipeline import KEYS, ingest, results, wait_for
from .test_poison import STREAM, fault

_MUTATORS = {list: ("append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "__setitem__",
                    "__delitem__", "__iadd__"),
             dict: ("__setitem__", "__delitem__", "pop", "popitem", "setdefault", "update", "clear"),
             set: ("add", "discard", "remove", "pop", "clear", "update", "__ior__", "__isub__", "difference_update")}


class Writes:
    """Which threads wrote what: {(object label, attribute): {thread name}} (`attribute[]`: in place)."""

    def __init__(self):
        self.by: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._containers: dict[type, type] = {}

    def watch(self, obj, label: str) -> None:
        writes, cls = self, type(obj)

        def __setattr__(self, name, value):
            writes.by[(label, name)].add(threading.current_thread().name)
            cls.__setattr__(self, name, writes.wrap(value, label, name))

        for name, value in vars(obj).items():
            object.__setattr__(obj, name, self.wrap(value, label, name))
        obj.__class__ = type(cls.__name__, (cls,), {"__setattr__": __setattr__})

    def wrap(self, value, label: str, name: str):
        """A recording copy of a plain list, dict or set; anything else as it is."""
        kind = type(value)
        if kind not in _MUTATORS:
            return value
        writes = self

        def recorder(method):
            def call(self, *args, **kwargs):
                writes.by[(label, name + "[]")].add(threading.current_thread().name)
                return getattr(kind, method)(self, *args, **kwargs)
            return call

        recording = type(f"Recording{kind.__name__}", (kind,), {m: recorder(m) for m in _MUTATORS[kind]})
        return recording(value)


def test_each_stage_object_is_written_by_one_thread_only(redis_server, synthetic_bank_bytes):
    client = connect(redis_server.url)
    registry = BankRegistry(client, KEYS)
    tampered = registry.publish("default", synthetic_bank_bytes, activate=True)
    client.setrange(KEYS.bank_blob("default", tampered), 200, b"!")  # refused: the first batch is held
    ingest(redis_server.url, 12)
    stop = threading.Event()
    worker = Worker(connect(redis_server.url), WorkerSettings(name="w", device="cpu", max_batch=4, max_wait_ms=10,
                                                              refresh_s=0.2, retry_initial_s=0.1, retry_max_s=0.4,
                                                              prefetch=True), KEYS, stop)
    owners = {"worker": "loop", "reader": "loop", "streams": "loop", "holds": "loop", "report": "loop",
              "scorer": "score-w", "banks": "score-w", "writer": "write-w"}
    writes = Writes()
    for label, obj in [("worker", worker), ("reader", worker.reader), ("streams", worker.reader.streams),
                       ("holds", worker.holds), ("report", worker.report), ("scorer", worker.scorer),
                       ("banks", worker.scorer.banks), ("writer", worker.writer)]:
        writes.watch(obj, label)
    loop = threading.Thread(target=worker.run, name="loop", daemon=True)
    loop.start()
    try:
        wait_for(lambda: "refused" in fault(client))  # held: the fault shows
        assert client.xpending(STREAM, FRAME_GROUP)["pending"] == 4  # one batch taken and held
        registry.publish("default", synthetic_bank_bytes, activate=True)
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 12 and fault(client) == "")  # retried, scored
        ingest(redis_server.url, 16, seed=1)
        wait_for(lambda: client.xlen(KEYS.results("cam-1")) == 28)  # pipelined, once proven
    finally:
        stop.set()
        loop.join(timeout=60)
    assert not loop.is_alive()
    assert len(results(client)) == 28 and worker.report.results == 28 and worker.report.held >= 4
    # the recording saw the state each thread keeps: the hold and its retry, the reads, the banks loaded
    for written in [("holds", "entries"), ("holds", "retry_at"), ("holds", "faulted"), ("worker", "_proven"),
                    ("worker", "_unwritten"), ("report", "results"), ("report", "held"), ("reader", "_waiting"),
                    ("banks", "_scorers[]"), ("banks", "_refused[]"), ("banks", "_errors[]")]:
        assert written in writes.by, written
    wrong = {key: threads for key, threads in writes.by.items() if threads != {owners[key[0]]}}
    assert not wrong  # every attribute of a stage object, written by its stage's thread alone
