"""The writer stage (the writer thread): a batch's outcomes go to Redis, each frame acknowledged (and deleted from
its stream) by the same atomic script that writes its outcome: dead letters first, then the results, one pipeline
per server holding the cameras (and WAIT for replicas when asked). Holds nothing itself: Held outcomes, and the
whole batch when Redis refuses the writes, go back to the loop in Written."""
from __future__ import annotations

import logging
import time

import redis

from contracts.keys import FRAME_GROUP, Keys
from runtime.connection import is_cluster, node_groups
from runtime.deadletter import DeadLetters
from runtime.metrics import results_written
from runtime import scripts
from runtime.streams import REDIS_ERRORS
from workers.outcomes import DeadLetter, Entry, Held, Outcomes, Scored, Suspect, Written, redis_held
from workers.settings import WorkerSettings

log = logging.getLogger("patchcore.worker")


class Writer:
    def __init__(self, client: redis.Redis, settings: WorkerSettings, keys: Keys):
        self.client, self.settings, self.keys = client, settings, keys
        self._ack_and_write = scripts.load(client, "ack_and_write")
        self._deadletters = DeadLetters(client, keys, settings.deadletters)

    def write(self, batch: Outcomes) -> Written:
        """Write the batch's outcomes. If Redis refuses (OOM, READONLY, an outage) the whole batch is held:
        outcomes already written stay written (a retry finds them acknowledged and writes nothing twice)."""
        results = deadlettered = 0
        held = tuple((entry, o) for entry, o in batch.outcomes if isinstance(o, Held))
        try:
            for entry, outcome in batch.outcomes:
                if isinstance(outcome, DeadLetter):
                    deadlettered += self._deadletter(entry, outcome.reason)
            scored = [(entry, o) for entry, o in batch.outcomes if isinstance(o, Scored)]
            if scored:
                results = self._write_results(scored)
        except REDIS_ERRORS as exc:
            held = redis_held(self.client, batch.entries, exc)
        suspects = sum(isinstance(o, Suspect) for _, o in batch.outcomes)
        return Written(results, deadlettered, suspects, held)

    def _deadletter(self, entry: Entry, reason: str) -> bool:
        added = self._deadletters.add(entry.stream, FRAME_GROUP, entry.entry_id, entry.raw, reason, self.settings.name)
        log.warning("frame dead-lettered", extra={"fields": {"stream": entry.stream, "reason": reason}})
        return added

    def _write_results(self, scored: list[tuple[Entry, Scored]]) -> int:
        """One pipeline per server holding these cameras (one on a single Redis, where it is a MULTI unless it
        waits for replicas: WAIT does not wait inside MULTI). On a cluster each frame's write is still one
        atomic script (its keys share the camera's slot); the overlay is written before its result.
        Returns how many results this worker wrote (0 for a frame another worker finished first)."""
        started = time.perf_counter()
        transaction = not is_cluster(self.client) and not self.settings.wait_replicas
        written_rows: list[int] = []  # positions in `scored` whose result this worker wrote
        for node, positions in node_groups(self.client, [entry.stream for entry, _ in scored]):
            script_calls = []  # positions of the script replies among the pipeline's replies
            with node.pipeline(transaction=transaction) as pipe:
                for i in positions:
                    entry, outcome = scored[i]
                    message = outcome.result
                    if outcome.overlay is not None:
                        pipe.set(message.overlay_key, outcome.overlay, ex=self.settings.overlay_ttl_s)
                        # the frame itself, so an operator can dismiss a false alarm into the next bank update
                        pipe.set(self.keys.frame_copy(message.camera, message.seq), entry.raw,
                                 ex=self.settings.overlay_ttl_s)
                    script_calls.append(len(pipe.command_stack))
                    scripts.ack_and_write(
                        self._ack_and_write, stream=entry.stream, group=FRAME_GROUP, entry_id=entry.entry_id,
                        target=self.keys.results(message.camera), stats=self.keys.camera_stats(message.camera),
                        counter="results", maxlen=self.settings.results_maxlen, fields={"m": message.pack()}, pipe=pipe)
                if self.settings.wait_replicas:
                    pipe.execute_command("WAIT", self.settings.wait_replicas, self.settings.wait_ms)
                replies = pipe.execute()
            written_rows += [i for i, call in zip(positions, script_calls) if replies[call]]
        write_s, now = (time.perf_counter() - started) / len(scored), time.time()
        for i in written_rows:
            entry, outcome = scored[i]
            message = outcome.result
            results_written([(message.camera, message.anomalous, message.captured_at, entry.picked_at,
                              outcome.decode_ms / 1000)], outcome.score_ms / 1000, write_s, now)
        return len(written_rows)
