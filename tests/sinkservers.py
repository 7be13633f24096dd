"""Real destinations on loopback for the sink tests and bench/sink_latency.py: an HTTP receiver (http.server in a
thread) that checks each webhook's signature and can fail or refuse, a Debian mosquitto per test, an asyncua
server with a PLC-style node layout; and what writes verdicts and alarms into Redis as the workers and store do."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from contracts.keys import Keys
from contracts.messages import Alarm, DriftEvent, Result

MOSQUITTO = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).is_file()), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def wait_for(condition, timeout: float = 30.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


# ---- what the workers and the store write --------------------------------------------------------------------
def result(camera: str, seq: int, line: str = "line-1", score: float = 0.5, threshold: float | None = 1.0,
           bank: str = "bottle") -> Result:
    now = time.time()
    return Result(camera=camera, line=line, seq=seq, captured_at=now, scored_at=now, score=score, threshold=threshold,
                  anomalous=threshold is not None and score >= threshold, bank=bank, bank_version=1, worker="w-1")


def alarm(camera: str, seq: int, line: str = "line-1") -> Alarm:
    return Alarm(camera=camera, line=line, seq=seq, score=2.0, threshold=1.0, bank="bottle", bank_version=1,
                 raised_at=time.time(), rule="1-of-1, cooldown 0 s", k=1, n=1, over=1)


def write_results(client, keys: Keys, camera: str, seqs, **kwargs) -> None:
    client.sadd(keys.cameras, camera)
    with client.pipeline(transaction=False) as pipe:
        for seq in seqs:
            pipe.xadd(keys.results(camera), {"m": result(camera, seq, **kwargs).pack()})
        pipe.execute()


def write_alarms(client, keys: Keys, camera: str, seqs) -> None:
    client.sadd(keys.cameras, camera)
    for seq in seqs:
        client.xadd(keys.alarms(camera), {"m": alarm(camera, seq).pack()})


def drift_events(camera: str, line: str = "line-1", first_seq: int = 40) -> list[DriftEvent]:
    """A camera's drift episode as the store decides it (store.alarms.drift.DriftTracker): a scene that moves (drift),
    an operator's acknowledgement, the scene's return (drift-cleared); numbered from 1."""
    from store.alarms.drift import DriftSettings, DriftTracker

    tracker, events = DriftTracker(DriftSettings()), []
    seq = first_seq
    for ratio, frames in ((0.5, 32), (2.0, 40), (None, 0), (0.5, 40)):
        if ratio is None:  # the operator acknowledges
            events.append(tracker.acknowledge("alice", time.time()))
            continue
        for _ in range(frames):
            events += tracker.add(seq, ratio, 1.0, line, time.time())
            seq += 1
    return [DriftEvent(camera=camera, **event) for event in events]


def write_drift(client, keys: Keys, camera: str, events) -> None:
    """Append `events` to the camera's drift stream as runtime/lua/commit_drift.lua does (fields n and m)."""
    client.sadd(keys.cameras, camera)
    for event in events:
        client.xadd(keys.drift(camera), {"n": event.n, "m": event.pack()})


# ---- webhook receiver -----------------------------------------------------------------------------------------
class Receiver:
    """An HTTP server on loopback that records each POST whose signature checks out (key, body, when); the first
    `fail_first` requests get 503; bodies whose seq is in `refuse_seqs` get 400; `delay_s` per request."""

    def __init__(self, secret: bytes | None, port: int | None = None, fail_first: int = 0,
                 refuse_seqs: frozenset = frozenset(), delay_s: float = 0.0):
        self.secret, self.fail_first, self.refuse_seqs, self.delay_s = secret, fail_first, refuse_seqs, delay_s
        self.port = port or free_port()
        self.received: list[dict] = []  # {"key", "body", "at"}
        self.bad_signatures = 0
        self.requests = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()  # kept-alive ones too: stopped, the receiver is gone

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def signature_ok(self, headers, body: bytes) -> bool:
        if self.secret is None:
            return True
        timestamp = headers.get("X-Patchcore-Timestamp", "")
        expected = "sha256=" + hmac.new(self.secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        fresh = timestamp.isdigit() and abs(time.time() - int(timestamp)) < 300
        return fresh and hmac.compare_digest(expected, headers.get("X-Patchcore-Signature", ""))

    def start(self) -> "Receiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with receiver._lock:
                    receiver._connections.add(self.connection)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests += 1
                    failing = receiver.requests <= receiver.fail_first
                if receiver.delay_s:
                    time.sleep(receiver.delay_s)
                if failing:
                    return self._reply(503)
                if not receiver.signature_ok(self.headers, body):
                    with receiver._lock:
                        receiver.bad_signatures += 1
                    return self._reply(401)
                payload = json.loads(body)
                if payload["seq"] in receiver.refuse_seqs:
                    return self._reply(400, b"seq refused by the test")
                assert payload["id"] == self.headers["Idempotency-Key"]
                with receiver._lock:
                    receiver.received.append({"key": payload["id"], "body": payload, "at": time.time()})
                self._reply(200)

            def _reply(self, status: int, text: bytes = b"") -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self._lock:
            for connection in self._connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()

    def keys(self) -> list[str]:
        with self._lock:
            return [r["key"] for r in self.received]


# ---- mosquitto -------------------------------------------------------------------------------------------------
class Mosquitto:
    """Debian's mosquitto on a free loopback port, from a config file of its own (anonymous, or with a password
    file when `users` is given)."""

    def __init__(self, folder: Path, port: int | None = None, users: dict[str, str] | None = None,
                 tls: tuple[Path, Path] | None = None):
        self.folder, self.port, self.users, self.tls = folder, port or free_port(), users, tls
        self.process: subprocess.Popen | None = None

    def start(self) -> "Mosquitto":
        config = [f"listener {self.port} 127.0.0.1", "persistence false", "log_dest stderr", "log_type error"]
        if os.geteuid() == 0:  # as root mosquitto would become `mosquitto`, who cannot read the test's folder
            config.append("user root")
        if self.tls:  # (certificate, key): TLS only on this listener
            cert, key = self.tls
            config += [f"certfile {cert}", f"keyfile {key}"]
        if self.users:
            passwd = self.folder / "passwd"
            passwd.write_text("")
            for user, password in self.users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
            config += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            config.append("allow_anonymous true")
        path = self.folder / f"mosquitto-{self.port}.conf"
        path.write_text("\n".join(config) + "\n")
        self.process = subprocess.Popen([MOSQUITTO, "-c", str(path)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        if not wait_for(self._listening, 10):
            self.stop()
            raise RuntimeError("mosquitto did not start")
        return self

    def _listening(self) -> bool:
        return port_open(self.port)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost and its key (openssl), valid one day."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True)
    return cert, key


class Subscriber:
    """A paho client subscribed to `topic` (QoS 1) that records (topic, payload dict, retained, when)."""

    def __init__(self, port: int, topic: str = "#", ca_file: Path | None = None):
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict, bool, float]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_connect = lambda client, *args: client.subscribe(topic, qos=1)
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscription not confirmed")

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain), time.time()))

    def keys(self, retained: bool | None = None) -> list[str]:
        with self._lock:
            return [m[1]["id"] for m in self.messages if retained is None or m[2] == retained]

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ---- OPC UA ----------------------------------------------------------------------------------------------------
OPCUA_NODES = {"Verdict": "Boolean", "Score": "Double", "Threshold": "Double", "Seq": "Int64", "AlarmSeq": "Int64",
               "Timestamp": "DateTime", "Drift": "Boolean", "DriftSeq": "Int64"}  # docs/sinks.md's layout for a PLC


class PlcServer:
    """An asyncua server on loopback (its own event loop in a thread) with the PLC-style layout: Objects/<root>/
    <camera>/{Verdict, Score, Threshold, Seq, AlarmSeq, Timestamp, Drift, DriftSeq} for each of `cameras` (`types`
    overrides a node's type, to test a mismatch; `omit` maps a camera to nodes it lacks). Every Write request that reaches the nodes is recorded, in order, as
    (camera, {node: value})."""

    def __init__(self, cameras, namespace_uri: str = "urn:patchcore:line", root: str = "Patchcore",
                 port: int | None = None, types: dict | None = None, omit: dict | None = None):
        self.cameras, self.namespace_uri, self.root = list(cameras), namespace_uri, root
        self.omit = omit or {}
        self.port = port or free_port()
        self.types = {**OPCUA_NODES, **(types or {})}
        self.writes: list[tuple[str, dict]] = []
        self.write_at: list[float] = []  # when each of `writes` arrived (unix seconds)
        self._names: dict = {}  # node id -> (camera, node name)
        self._lock = threading.Lock()
        self._loop = None
        self._thread: threading.Thread | None = None
        self._stopped = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}"

    def start(self) -> "PlcServer":
        import asyncio

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"the OPC UA server did not start: {self._error!r}")
        return self

    async def _serve(self) -> None:
        import asyncio
        import logging

        from asyncua import Server, ua
        from asyncua.common.callback import CallbackType

        logging.getLogger("asyncua").setLevel(logging.ERROR)
        self._stopped = asyncio.Event()
        try:
            server = Server()
            await server.init()
            server.set_endpoint(f"opc.tcp://127.0.0.1:{self.port}/")
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
            ns = await server.register_namespace(self.namespace_uri)
            root = await server.nodes.objects.add_object(ns, self.root)
            for camera in self.cameras:
                folder = await root.add_folder(ns, camera)
                for name, kind in self.types.items():
                    if name in self.omit.get(camera, ()):
                        continue
                    initial = {"Boolean": False, "Double": 0.0, "Int64": 0, "DateTime": None, "String": ""}[kind]
                    node = await folder.add_variable(ns, name, initial, getattr(ua.VariantType, kind))
                    await node.set_writable()
                    self._names[node.nodeid] = (camera, name)
            server.iserver.subscribe_server_callback(CallbackType.PostWrite, self._on_write)
            async with server:
                self._ready.set()
                await self._stopped.wait()
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()

    def _on_write(self, event, dispatcher) -> None:
        by_camera: dict[str, dict] = {}
        for item, status in zip(event.request_params.NodesToWrite, event.response_params):
            if item.NodeId in self._names and status.is_good():
                camera, name = self._names[item.NodeId]
                by_camera.setdefault(camera, {})[name] = item.Value.Value.Value
        now = time.time()
        with self._lock:
            self.writes += list(by_camera.items())
            self.write_at += [now] * len(by_camera)

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(30)
            self._loop.close()
            self._loop = None

    def seqs(self, camera: str, node: str = "Seq") -> list[int]:
        with self._lock:
            return [values[node] for cam, values in self.writes if cam == camera and node in values]


# ---- Modbus TCP ------------------------------------------------------------------------------------------------
class ModbusPlc:
    """A pymodbus TCP server on loopback (its own event loop in a thread) standing in for a PLC: unit `unit`,
    `coils` coils and `registers` holding registers from address 0 (beyond them: the ILLEGAL_ADDRESS exception).
    Every write that reaches the datastore is recorded in order as (function code, address, values), and when it
    came in `write_at` (unix seconds); the record outlives a stop and a start on the same port (a PLC restarted
    keeps its program's log, not its registers)."""

    def __init__(self, unit: int = 1, coils: int = 64, registers: int = 64, port: int | None = None):
        self.unit, self.coils, self.registers = unit, coils, registers
        self.port = port or free_port()
        self.writes: list[tuple[int, int, list]] = []
        self.write_at: list[float] = []
        self._lock = threading.Lock()
        self._loop = None
        self._thread: threading.Thread | None = None
        self._server = None

    def start(self) -> "ModbusPlc":
        import asyncio

        from pymodbus.server import ModbusTcpServer
        from pymodbus.simulator import SimData, SimDevice
        from pymodbus.simulator.simutils import DataType

        async def record(function_code, start, address, count, current, values):
            if values is not None:
                with self._lock:
                    self.writes.append((function_code, address, list(values)))
                    self.write_at.append(time.time())
            return None

        device = SimDevice(id=self.unit, action=record, simdata=(
            [SimData(0, count=self.coils, values=False, datatype=DataType.BITS)],
            [SimData(0, count=16, values=False, datatype=DataType.BITS)],
            [SimData(0, count=self.registers, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)]))
        self._loop = asyncio.new_event_loop()

        async def serve():
            self._server = ModbusTcpServer(device, address=("127.0.0.1", self.port))
            await self._server.serve_forever()

        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(serve(),), daemon=True)
        self._thread.start()
        if not wait_for(self._listening, 10):
            raise RuntimeError("the Modbus server did not start")
        return self

    def _listening(self) -> bool:
        return port_open(self.port)

    def stop(self) -> None:
        import asyncio

        if self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop).result(10)
            self._thread.join(10)
            self._loop.close()
            self._loop = None

    def recorded(self) -> list[tuple[int, int, list]]:
        with self._lock:
            return list(self.writes)

    def recorded_at(self) -> list[tuple[tuple[int, int, list], float]]:
        with self._lock:
            return list(zip(self.writes, self.write_at))

    def read(self, coil: int, coils: int, register: int, registers: int) -> tuple[list[bool], list[int]]:
        """Coils and holding registers as a PLC program reads them (a Modbus client, FC1 and FC3)."""
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient("127.0.0.1", port=self.port, timeout=2)
        try:
            assert client.connect()
            bits = client.read_coils(coil, count=coils, device_id=self.unit).bits[:coils]
            words = client.read_holding_registers(register, count=registers, device_id=self.unit).registers
            return bits, words
        finally:
            client.close()
