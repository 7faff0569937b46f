"""A session with a running device program: the framed byte protocol's host side (version 4,
``microtvm_projects/common/tinytrain_protocol.h``) over any transport (:mod:`.transport`).

Every request carries an id the response echoes; a response with another id (a late answer to a
request that timed out) is dropped. After a timeout or a response that does not check out, the
session resynchronises: it sends enough zero bytes to finish any frame the device is still
reading, then asks for 'I' again; when that fails too, the error says to reset the device.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from relay_passes.attrs import LEARNING_RATE

from ..errors import InputError, NonFiniteError
from ..quantize import reconstruction_target
from ..trainer import checked_learning_rate, checked_sample, nonfinite_message
from .project import DeviceError
from .transport import LinkTimeout

PROTOCOL_VERSION = 4
REQUEST_MAGIC, RESPONSE_MAGIC = b"\xa5\x5a", b"\x5a\xa5"
COMMANDS = {"I": "info", "T": "train step", "P": "predict", "G": "get parameters", "S": "set parameters",
            "R": "reset parameters", "L": "learning rate", "M": "memory", "W": "save", "E": "erase saves",
            "Q": "quit"}
STATUS = {1: "bad checksum", 2: "bad length", 3: "unknown command", 4: "kernel failure (workspace)",
          5: "non-finite step", 6: "learning rate must be a finite number >= 0", 7: "label out of range",
          8: "non-finite value", 9: "no persistent region, or it failed"}
INFO = ("version", "arena", "input", "label", "output", "params", "state", "model_id", "boot_source",
        "boot_sequence", "boot_reasons", "slot_bytes")
# tinytrain_persist.h: why a slot was not used, per slot k: flag << 8k
EMPTY, CORRUPT, OTHER_MODEL, READ_FAILED, OLDER, NO_REGION = 1, 2, 4, 8, 16, 0x10000
SLOT_PROBLEMS = {EMPTY: "is empty", CORRUPT: "failed its CRC", OTHER_MODEL: "holds another model's save",
                 READ_FAILED: "could not be read"}


class _BadResponse(Exception):
    pass


@dataclass(frozen=True)
class Boot:
    """Where the device's parameters came from when it started."""

    source: str  # "slot 0", "slot 1" or "compiled-in"
    sequence: int  # the save's number (0 for compiled-in)
    reasons: int  # tinytrain_persist.h's TINYTRAIN_BOOT_* flags
    message: str  # one line a user reads

    @classmethod
    def from_info(cls, source: int, sequence: int, reasons: int) -> Boot:
        start = "starting from the compiled-in weights"
        if reasons & NO_REGION:
            return cls("compiled-in", 0, reasons, f"no persistent region: {start}")
        problems = []
        for k in (0, 1):
            flags = (reasons >> (8 * k)) & 0xFF
            what = next((text for flag, text in SLOT_PROBLEMS.items() if flags & flag), None)
            if what and not (what == "is empty" and source == 2):
                problems.append(f"slot {k} {what}")
        if source == 2:
            if reasons == EMPTY | EMPTY << 8:
                return cls("compiled-in", 0, reasons, f"no save yet: {start}")
            return cls("compiled-in", 0, reasons, f"{', '.join(problems)}; {start}")
        where = f"continuing from slot {source} (save #{sequence})"
        problems = [p for p in problems if not p.endswith("is empty")]
        message = f"{'; '.join(problems)}; {where}" if problems else where
        return cls(f"slot {source}", sequence, reasons, message)


class Session:
    """The protocol's calls over a transport; ``with`` opens and closes the link.

    ``model_dir``: the project folder (or the artifact folder) whose ``metadata.json`` describes the
    device's model. ``cost_unit``: the unit of ``last_cost``, "ns", "instructions" or "cycles"."""

    def __init__(self, transport, model_dir: str | Path, cost_unit: str, timeout: float = 30.0):
        self.transport, self.cost_unit, self.timeout = transport, cost_unit, float(timeout)
        model_dir = Path(model_dir)
        meta = model_dir / "metadata.json"
        if not meta.is_file():
            meta = model_dir / "model" / "metadata.json"
        try:
            self.metadata = json.loads(meta.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read {meta} ({err}); make the project again") from None
        self.last_cost: int | None = None
        self.steps_done = 0  # training steps the device applied in this session
        self.last_status = 0
        self.boot: Boot | None = None
        self.info: dict | None = None
        self._id = 0
        self._buf = bytearray()
        self._open = False
        tensors = (*self.metadata["trainable"], *self.metadata["optimizer_state"])
        self._ram_bytes = max((-(-(s["offset"] + s["bytes"]) // 16) * 16 for s in tensors), default=0)
        self._chunk = min(self.metadata["memory"]["arena_bytes"], self._ram_bytes) & ~3
        longest = max(self.metadata["input"]["bytes"] + self.metadata["label"]["bytes"], self._chunk + 4)
        self._filler = bytes(longest + 8 + 4 + 8)  # finishes any frame the device is reading
        self._longest_response = max(self._ram_bytes, self.metadata["output"]["bytes"] + 8, 64)

    @property
    def returncode(self) -> int | None:
        """The device program's exit code once the session closed (pipe transports)."""
        return getattr(self.transport, "returncode", None)

    @property
    def cost_name(self) -> str:
        return self.cost_unit

    def __enter__(self) -> Session:
        self.transport.open()
        self._open = True
        try:
            self._check_info(self._call(b"I"))
        except BaseException:
            self.transport.close(wait=False)
            self._open = False
            raise
        return self

    def _check_info(self, body: bytes) -> None:
        if len(body) < 4 or struct.unpack_from("<I", body)[0] != PROTOCOL_VERSION:
            version = struct.unpack_from("<I", body)[0] if len(body) >= 4 else "?"
            raise DeviceError(f"the device speaks protocol {version}, this library {PROTOCOL_VERSION}: "
                              "build and flash the project again")
        if len(body) != 4 * len(INFO):
            raise DeviceError(f"the device's info is {len(body)} bytes, not {4 * len(INFO)}: build and flash "
                              "the project again")
        self.info = dict(zip(INFO, struct.unpack(f"<{len(INFO)}I", body)))
        expected = self.metadata.get("model_id")
        if expected is not None and self.info["model_id"] != expected:
            raise DeviceError(f"the device runs another model (id {self.info['model_id']:08X}, this "
                              f"project's is {expected:08X}): build and flash this project")
        info = self.info
        self.boot = Boot.from_info(info["boot_source"], info["boot_sequence"], info["boot_reasons"])

    def __exit__(self, *exc) -> None:
        if not self._open:
            return
        try:
            if exc[0] is None:
                self._call(b"Q", timeout=min(self.timeout, 10.0))
        except DeviceError:
            pass
        finally:
            self.transport.close(wait=exc[0] is None)
            self._open = False

    # ---- frames ------------------------------------------------------------------------------
    def _send(self, cmd: bytes, payload: bytes) -> int:
        self._id = (self._id + 1) & 0xFF
        head = cmd + bytes([self._id]) + struct.pack("<I", len(payload))
        self.transport.write(REQUEST_MAGIC + head + payload + struct.pack("<I", zlib.crc32(head + payload)))
        return self._id

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            self._buf += self.transport.read(max(n - len(self._buf), 1), deadline)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _response(self, deadline: float) -> tuple[int, int, bytes]:
        """The next response (status, id, payload), found by its magic."""
        while True:
            at = self._buf.find(RESPONSE_MAGIC)
            if at >= 0:
                del self._buf[:at + 2]
                break
            del self._buf[:max(len(self._buf) - 1, 0)]  # keep a byte that may start the magic
            self._buf += self.transport.read(4096, deadline)
        head = self._take(6, deadline)
        status, rid, length = head[0], head[1], struct.unpack_from("<I", head, 2)[0]
        if length > self._longest_response:
            raise _BadResponse(f"a response of {length} bytes")
        body = self._take(length, deadline)
        (crc,) = struct.unpack("<I", self._take(4, deadline))
        if crc != zlib.crc32(head + body):
            raise _BadResponse("a response that failed its checksum")
        return status, rid, body

    def _request(self, cmd: bytes, payload: bytes, timeout: float) -> tuple[int, bytes]:
        rid = self._send(cmd, payload)
        deadline = time.monotonic() + timeout
        while True:
            status, got, body = self._response(deadline)
            if got == rid:
                return status, body  # others are late answers to requests that timed out

    def _resync(self) -> bool:
        """Finish whatever frame the device is reading, then check it answers 'I'."""
        try:
            self._buf.clear()
            self.transport.write(self._filler)
            status, body = self._request(b"I", b"", min(self.timeout, 10.0))
            return status == 0 and len(body) >= 4 and struct.unpack_from("<I", body)[0] == PROTOCOL_VERSION
        except (LinkTimeout, _BadResponse, DeviceError):
            return False

    def _call(self, cmd: bytes, payload: bytes = b"", allow: tuple[int, ...] = (),
              timeout: float | None = None) -> bytes:
        """Send one request; the response's payload. A non-zero status raises DeviceError unless
        it is in ``allow`` (then ``self.last_status`` tells)."""
        if not self._open:
            raise DeviceError("the session is not open: use `with project.session() as dev:`")
        timeout = self.timeout if timeout is None else timeout
        name = f"{cmd.decode()!r} ({COMMANDS.get(cmd.decode(), 'unknown')})"
        try:
            status, body = self._request(cmd, payload, timeout)
        except (LinkTimeout, _BadResponse) as err:
            problem = f"did not answer {name} within {timeout:g} s" if isinstance(err, LinkTimeout) \
                else f"sent {err} to {name}"
            after = "; the link is resynchronised" if self._resync() else \
                "; it does not answer any more: reset it (restart or power-cycle the board)"
            raise DeviceError(f"{self.transport} {problem}{after}") from None
        self.last_status = status
        if status and status not in allow:
            raise DeviceError(f"device refused {name}: {STATUS.get(status, f'status {status}')}")
        return body

    # ---- samples -----------------------------------------------------------------------------
    def _tensor(self, value, spec: dict, what: str) -> bytes:
        arr = np.asarray(value)
        shape = tuple(spec["shape"])
        if arr.size != int(np.prod(shape)):
            raise InputError(f"{what} has shape {arr.shape}; the model takes {shape} ({spec['dtype']})")
        return np.ascontiguousarray(arr.reshape(shape), dtype=spec["dtype"]).tobytes()

    def _target(self, x) -> np.ndarray:
        """An autoencoder's target: its input as float (see ``HostTrainer.reconstruction_target``)."""
        if self.metadata["loss"] != "mse":
            raise InputError(f"a {self.metadata['loss']} step needs a label; only an mse model trains on "
                             "its own input (an autoencoder)")
        shape = tuple(self.metadata["output"]["shape"])
        return reconstruction_target(x, shape, self.metadata.get("input_quant"))

    def anomaly_score(self, x) -> float:
        """An autoencoder's reconstruction error of one sample on the device, ``mean((predict(x) − x)²)``."""
        target = self._target(x)
        return float(np.mean((self.predict(x).astype(np.float64) - target) ** 2))

    def train_step(self, x, y=None) -> float:
        """One training step on the device; returns the loss before the update. With the ``mse``
        loss and no ``y``, the target is the input itself (an autoencoder)."""
        y = self._target(x) if y is None else y
        label = self.metadata["label"]
        if self.metadata["loss"] == "cross_entropy":
            y = np.asarray(y).reshape(-1)
            classes = self.metadata["output"]["shape"][-1]
            if y.size != 1 or not np.issubdtype(y.dtype, np.integer) or not 0 <= int(y[0]) < classes:
                raise InputError(f"label {y!r} must be one integer class index in 0..{classes - 1}")
        if self.metadata["loss"] != "cross_entropy" and not np.all(np.isfinite(np.asarray(y, np.float64))):
            raise InputError("target holds inf/NaN values; clean or drop the sample")
        payload = self._input(x) + self._tensor(y, label, "label")
        body = self._call(b"T", payload, allow=(5,))
        loss, cost, rc = struct.unpack("<fQI", body)
        self.last_cost = cost
        if self.last_status == 5:
            names = {2: "input", 3: "loss"} | {16 + i: s["name"] for i, s in enumerate(
                (*self.metadata["trainable"], *self.metadata["optimizer_state"]))}
            tensor = names.get(rc, f"status {rc}")
            message = nonfinite_message(self.steps_done, tensor, 0, self.learning_rate)
            self.last_status = 5  # reading the rate was a request of its own
            raise NonFiniteError(message)
        self.steps_done += 1
        return loss

    def _input(self, x) -> bytes:
        """One sample's bytes, refused as HostTrainer refuses it (inf/NaN, float data for int8)."""
        spec = self.metadata["input"]
        arr = np.asarray(x)
        if arr.size != int(np.prod(spec["shape"])):
            raise InputError(f"input has shape {arr.shape}; the model takes {tuple(spec['shape'])} "
                             f"({spec['dtype']})")
        return checked_sample(arr, spec["dtype"]).reshape(spec["shape"]).tobytes()

    def predict(self, x) -> np.ndarray:
        out = self.metadata["output"]
        body = self._call(b"P", self._input(x))
        self.last_cost = struct.unpack("<Q", body[-8:])[0]
        return np.frombuffer(body[:-8], dtype=out["dtype"]).reshape(out["shape"]).copy()

    # ---- the RAM block: trainable parameters, then optimizer state -----------------------------
    def _block(self) -> bytes:
        return self._call(b"G")

    def params(self) -> dict[str, np.ndarray]:
        """The trainable parameters on the device, by name (weights split for a partial update
        come back as their trainable slice, named as in ``metadata.json``)."""
        return self._unpack(self._block(), self.metadata["trainable"])

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self._unpack(self._block(), self.metadata["optimizer_state"])

    @staticmethod
    def _unpack(block: bytes, specs: list[dict]) -> dict[str, np.ndarray]:
        return {s["name"]: np.frombuffer(block, dtype=s["dtype"], count=int(np.prod(s["shape"])),
                                         offset=s["offset"]).reshape(s["shape"]).copy() for s in specs}

    def set_params(self, values: dict[str, np.ndarray]) -> None:
        """Overwrite trainable parameters (and optimizer state, when given) on the device, in chunks
        the device stages in its arena and checks before it writes them."""
        block = bytearray(self._block())
        known = {s["name"]: s for s in (*self.metadata["trainable"], *self.metadata["optimizer_state"])}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"the device holds no tensor {unknown[0]!r}; names: {', '.join(known)}")
        for name, value in values.items():
            s, value = known[name], np.asarray(values[name])
            if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                raise InputError(f"{name} holds inf/NaN values; the device keeps its own")
            if name == LEARNING_RATE and not float(value.reshape(-1)[0]) >= 0:
                raise InputError(f"{name} must be a finite number >= 0, not {float(value.reshape(-1)[0])}")
            block[s["offset"]:s["offset"] + s["bytes"]] = self._tensor(value, s, name)
        for offset in range(0, len(block), self._chunk):
            chunk = bytes(block[offset:offset + self._chunk])
            self._call(b"S", struct.pack("<I", offset) + chunk)

    def reset(self) -> None:
        """The RAM block back to the compiled-in values (saves are kept: see ``erase_saved``)."""
        self._call(b"R")

    def save(self) -> int:
        """Write the parameters and optimizer state to the device's persistent region; the save's
        sequence number (the device boots from the newest valid save)."""
        return struct.unpack("<I", self._call(b"W"))[0]

    def erase_saved(self) -> None:
        """Erase both saves: the next boot starts from the compiled-in values."""
        self._call(b"E")

    @property
    def learning_rate(self) -> float:
        """The device's learning rate for the next steps (``HostTrainer.learning_rate``'s twin)."""
        return float(self.optimizer_state()[LEARNING_RATE])

    @learning_rate.setter
    def learning_rate(self, lr: float) -> None:
        self._call(b"L", struct.pack("<f", checked_learning_rate(lr)))

    def stack(self) -> tuple[int, int]:
        """(stack bytes used so far, stack bytes reserved); (0, 0) where the port cannot tell."""
        return struct.unpack("<II", self._call(b"M"))
