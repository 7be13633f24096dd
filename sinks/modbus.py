"""Modbus TCP destination (pymodbus' synchronous client): each message written into its camera's block of coils and
holding registers on a PLC (a Modbus server), which reads them at the reject gate.

The register map (docs/sinks.md has it as a table for the PLC programmer): each camera has a base address `B`
(`--map cam=B`, or a map file), the same in the coil table and in the holding-register table (0-based protocol
addresses, as they go on the wire; a PLC that numbers from 1 or from 40001 adds its own offset):

    coil B+0       Verdict    the latest frame is anomalous (reject)
    coil B+1       Alarm      set by each alarm (the PLC resets it once it has acted)
    coil B+2       Drift      the camera's whole scene has drifted (set by `drift`, cleared by `drift-cleared`)
    HR B+0..B+1    Seq        the frame's sequence number (uint32, its low 32 bits)
    HR B+2..B+3    Score      its anomaly score (float32)
    HR B+4..B+5    Threshold  the threshold it was judged with (float32, NaN: none)
    HR B+6..B+7    AlarmSeq   sequence number of the camera's latest alarm (uint32)
    HR B+8..B+9    DriftSeq   number of the camera's latest drift event (uint32)
    HR B+10        Heartbeat  +1 (mod 65536) after each message's values are written: written last

A 32-bit value spans two registers, high word first (`word_order="big"`, "ABCD", the Modbus convention) or low
word first (`"little"`, "CDAB"); the bytes within a register are big-endian as always. A message is one coil write
(FC5), one write of its registers (FC16) and then the heartbeat (FC6): when the PLC sees the heartbeat change,
the block holds one whole message. The heartbeat is read from the PLC (FC3) once per camera and connection, so
it goes on counting across sink restarts.

A camera without a block is refused for good (dead letter), and so is a Modbus exception reply (illegal
address, value or function, device failure: a map that does not fit the PLC), except those that say "not now"
(acknowledge, device busy, gateway path or target not answering) which are retried like a lost connection, a
refused one or a timeout: the client is closed and a new one connects on the next try.
"""
from __future__ import annotations

import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from pymodbus.client import ModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ModbusException
from pymodbus.pdu import ExceptionResponse

from contracts.keys import check_camera

from .messages import ALARM, DRIFT, Message
from .service import Attempt, SettingsError

# the block, relative to its camera's base address
VERDICT_COIL, ALARM_COIL, DRIFT_COIL = 0, 1, 2
SEQ, SCORE, THRESHOLD, ALARM_SEQ, DRIFT_SEQ, HEARTBEAT = 0, 2, 4, 6, 8, 10
COILS, REGISTERS = 3, 11  # a block's size in each table
MAX_ADDRESS = 0xFFFF
WORD_ORDERS = ("big", "little")
RETRIED = frozenset({ExcCodes.ACKNOWLEDGE, ExcCodes.DEVICE_BUSY, ExcCodes.GATEWAY_PATH_UNAVIABLE,
                     ExcCodes.GATEWAY_NO_RESPONSE})  # exception replies that say "not now" rather than "never"
FLOAT32_MAX = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]


@dataclass(frozen=True)
class ModbusSettings:
    host: str = field(default="localhost", metadata={"help": "Modbus TCP server (the PLC) host."})
    port: int = field(default=502, metadata={"help": "Modbus TCP port.", "min": 1, "max": 65535})
    unit: int = field(default=1, metadata={"help": "Modbus unit (device) id the requests address.", "min": 0,
                                           "max": 255})
    blocks: tuple[str, ...] = field(default=(), metadata={
        "help": "A camera's block: CAMERA=BASE (its base address in the coils and the holding registers, 0-based; "
                "repeat for more cameras)."})
    map_file: Path | None = field(default=None, metadata={
        "help": "File of CAMERA=BASE lines (blank lines and # comments ignored), with or instead of --map."})
    word_order: str = field(default="big", metadata={
        "help": "32-bit values over two registers: big (high word first, ABCD) or little (low word first, CDAB)."})
    timeout_s: float = field(default=3.0, metadata={"help": "Seconds to wait for the PLC's reply before retrying."})

    def __post_init__(self):
        if self.word_order not in WORD_ORDERS:
            raise SettingsError(f"bad word order {self.word_order!r}: one of {', '.join(WORD_ORDERS)}")
        if self.timeout_s <= 0:
            raise SettingsError("timeout_s must be positive")
        if not 0 <= self.unit <= 255:
            raise SettingsError(f"bad Modbus unit {self.unit}: 0 to 255")


def parse_block(text: str, where: str) -> tuple[str, int]:
    """(camera, base) of one `CAMERA=BASE` (the last `=` splits: a camera name may hold one; blanks around either
    side are dropped)."""
    camera, sep, base = (part.strip() for part in text.rpartition("="))
    if not sep:
        raise SettingsError(f"{where}: {text.strip()[:200]!r} is no CAMERA=BASE")
    try:
        check_camera(camera)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    if not (base.isascii() and base.isdigit()):
        raise SettingsError(f"{where}: the base of {camera!r} is no address: {base[:50]!r}")
    address = int(base)
    if not 0 <= address <= MAX_ADDRESS + 1 - REGISTERS:
        raise SettingsError(f"{where}: base {address} of {camera!r} out of range: 0 to {MAX_ADDRESS + 1 - REGISTERS} "
                            f"(a block is {REGISTERS} registers)")
    return camera, address


def register_map(settings: ModbusSettings) -> dict[str, int]:
    """camera -> base address, from the map file then --map; SettingsError for a bad line, a camera given twice,
    blocks that overlap, or no camera at all."""
    pairs: list[tuple[str, int]] = []
    if settings.map_file is not None:
        try:
            lines = settings.map_file.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"cannot read the Modbus map file {settings.map_file}: {exc}") from None
        pairs += [parse_block(line, f"{settings.map_file}:{number}") for number, line in enumerate(lines, 1)
                  if line.strip() and not line.lstrip().startswith("#")]
    pairs += [parse_block(text, "--map") for text in settings.blocks]
    if not pairs:
        raise SettingsError("no camera has a Modbus block: give --map CAMERA=BASE or --map-file")
    blocks: dict[str, int] = {}
    for camera, base in pairs:
        if camera in blocks:
            raise SettingsError(f"camera {camera!r} has two Modbus blocks ({blocks[camera]} and {base})")
        blocks[camera] = base
    ordered = sorted(blocks.items(), key=lambda pair: pair[1])
    for (first, base), (second, next_base) in zip(ordered, ordered[1:]):
        if next_base < base + REGISTERS:
            raise SettingsError(f"the Modbus blocks of {first!r} ({base}) and {second!r} ({next_base}) overlap: "
                                f"bases at least {REGISTERS} apart")
    return blocks


def words32(value: int | float, word_order: str, kind: str) -> list[int]:
    """Two registers of a uint32 (`kind` "I": the value's low 32 bits) or a float32 ("f"; beyond float32's range:
    +-infinity), in `word_order`."""
    if kind == "f" and math.isfinite(value) and abs(value) > FLOAT32_MAX:
        value = math.copysign(math.inf, value)
    high, low = struct.unpack(">HH", struct.pack(f">{kind}", value & 0xFFFFFFFF if kind == "I" else value))
    return [high, low] if word_order == "big" else [low, high]


def writes(message: Message, word_order: str) -> tuple[tuple[int, bool], tuple[int, list[int]]]:
    """What a message writes, relative to its camera's base: (coil, value), (first register, values)."""
    body = message.body
    if message.kind == ALARM:
        return (ALARM_COIL, True), (ALARM_SEQ, words32(message.seq, word_order, "I"))
    if message.kind == DRIFT:
        return (DRIFT_COIL, bool(body["drifted"])), (DRIFT_SEQ, words32(body["n"], word_order, "I"))
    threshold = math.nan if body["threshold"] is None else float(body["threshold"])
    return (VERDICT_COIL, bool(body["anomalous"])), (SEQ, words32(message.seq, word_order, "I")
                                                     + words32(float(body["score"]), word_order, "f")
                                                     + words32(threshold, word_order, "f"))


class Refused(Exception):
    """The PLC answered with a Modbus exception that is final for this message."""


class NotNow(Exception):
    """The PLC answered with a Modbus exception that says "try again later"."""


class Modbus:
    def __init__(self, settings: ModbusSettings):
        self.settings = settings
        self.blocks = register_map(settings)
        self.description = f"modbus {settings.host}:{settings.port} unit {settings.unit}"
        self._client: ModbusTcpClient | None = None
        self._heartbeats: dict[str, int] = {}  # camera -> the heartbeat last written (this connection)
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # the sink logs each failure itself, once

    def _connect(self) -> str | None:
        """A connected client in self._client, or the reason there is none."""
        if self._client is not None and self._client.connected:
            return None
        self._drop()
        client = ModbusTcpClient(self.settings.host, port=self.settings.port, timeout=self.settings.timeout_s,
                                 retries=0)
        if not client.connect():
            client.close()
            return f"cannot connect to {self.settings.host}:{self.settings.port}"
        self._client = client
        return None

    def _checked(self, reply, what: str):
        if isinstance(reply, ExceptionResponse):
            try:
                name = ExcCodes(reply.exception_code).name
            except ValueError:
                name = "unknown"
            text = f"Modbus exception {reply.exception_code} ({name}) on {what}"
            raise (NotNow if reply.exception_code in RETRIED else Refused)(text)
        return reply

    def _write(self, message: Message, base: int) -> None:
        """The message's coil, its registers, then the camera's heartbeat (read first once per connection)."""
        unit = self.settings.unit
        (coil, value), (first, registers) = writes(message, self.settings.word_order)
        client = self._client
        self._checked(client.write_coil(base + coil, value, device_id=unit), f"coil {base + coil}")
        self._checked(client.write_registers(base + first, registers, device_id=unit),
                      f"holding registers {base + first}..{base + first + len(registers) - 1}")
        beat = self._heartbeats.get(message.camera)
        if beat is None:
            beat = self._checked(client.read_holding_registers(base + HEARTBEAT, count=1, device_id=unit),
                                 f"holding register {base + HEARTBEAT}").registers[0]
        beat = (beat + 1) & 0xFFFF
        self._checked(client.write_register(base + HEARTBEAT, beat, device_id=unit),
                      f"holding register {base + HEARTBEAT}")
        self._heartbeats[message.camera] = beat

    def deliver(self, messages: Sequence[Message]) -> Attempt:
        done: list[str | None] = []
        error = self._connect()
        if error is not None:
            return Attempt(done, error)
        for message in messages:
            base = self.blocks.get(message.camera)
            if base is None:
                done.append(f"camera {message.camera!r} has no Modbus block (--map {message.camera}=BASE)")
                continue
            try:
                self._write(message, base)
                done.append(None)
            except Refused as exc:
                self._heartbeats.pop(message.camera, None)  # read again: the PLC may hold another one
                done.append(str(exc))
            except NotNow as exc:
                return Attempt(done, str(exc))
            except ModbusException as exc:  # connection refused, lost or closed, no reply in time
                self._drop()
                return Attempt(done, f"{type(exc).__name__}: {exc}")
        return Attempt(done)

    def _drop(self) -> None:
        client, self._client = self._client, None
        self._heartbeats = {}
        if client is not None:
            client.close()

    def close(self) -> None:
        self._drop()
