"""A session with a running device program: the framed byte protocol's host side."""

from __future__ import annotations

import json
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np

from relay_passes.attrs import LEARNING_RATE

from ..errors import InputError, NonFiniteError
from ..quantize import reconstruction_target
from ..trainer import checked_learning_rate, checked_sample, nonfinite_message
from .project import PROTOCOL_VERSION, DeviceError


class Session:
    """A running program speaking the framed byte protocol over its stdin / stdout."""

    def __init__(self, cmd: list[str], cwd: Path, cost_unit: str):
        self.cmd, self.cwd, self.cost_unit = cmd, cwd, cost_unit
        self.process: subprocess.Popen | None = None
        self.last_cost: float | None = None
        self.steps_done = 0  # training steps the device applied in this session

    def __enter__(self) -> Session:
        self.process = subprocess.Popen(self.cmd, cwd=self.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE)
        info = struct.unpack("<7I", self._call(b"I"))
        if info[0] != PROTOCOL_VERSION:
            raise DeviceError(f"device speaks protocol {info[0]}, this library {PROTOCOL_VERSION}")
        keys = ("version", "arena", "input", "label", "output", "params", "state")
        self.info = dict(zip(keys, info))
        meta = json.loads((self.cwd / "model" / "metadata.json").read_text())
        self.metadata = meta
        return self

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        try:
            if self.process.poll() is None and exc[0] is None:
                self._call(b"Q")
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, DeviceError):
            self.process.kill()
            self.process.wait()
        finally:
            self.returncode = self.process.returncode
            self.process = None

    # ---- frames ------------------------------------------------------------------------------
    def _call(self, cmd: bytes, payload: bytes = b"", allow: tuple[int, ...] = ()) -> bytes:
        """Send one request; the response's payload. A non-zero status raises DeviceError unless
        it is in ``allow`` (then ``self.last_status`` tells)."""
        p = self.process
        if p is None:
            raise DeviceError("the session is not open: use `with project.session() as dev:`")
        head = cmd + struct.pack("<I", len(payload))
        try:
            p.stdin.write(b"TT" + head + payload + struct.pack("<I", zlib.crc32(head + payload)))
            p.stdin.flush()
        except BrokenPipeError:
            raise DeviceError(self._died()) from None
        head = self._read(7)
        if head[:2] != b"TR":
            raise DeviceError(f"bad response {head!r}: the device is not a tvm-tinytrain program")
        status, length = head[2], struct.unpack("<I", head[3:7])[0]
        body = self._read(length)
        (crc,) = struct.unpack("<I", self._read(4))
        if crc != zlib.crc32(head[2:] + body):
            raise DeviceError("response checksum mismatch")
        self.last_status = status
        if status and status not in allow:
            what = {1: "checksum", 2: "length", 3: "unknown command", 4: "kernel failure (workspace)",
                    5: "non-finite step", 6: "learning rate must be a finite number >= 0"}
            raise DeviceError(f"device refused {cmd.decode()!r}: {what.get(status, status)}")
        return body

    def _read(self, n: int) -> bytes:
        data = self.process.stdout.read(n)
        if len(data) != n:
            raise DeviceError(self._died())
        return data

    def _died(self) -> str:
        self.process.wait(timeout=10)
        err = self.process.stderr.read().decode(errors="replace")[-2000:]
        return f"the device program stopped (exit code {self.process.returncode}){': ' + err if err else ''}"

    # ---- samples -----------------------------------------------------------------------------
    def _tensor(self, value, spec: dict, what: str) -> bytes:
        arr = np.asarray(value)
        shape = tuple(spec["shape"])
        if arr.size != int(np.prod(shape)):
            raise InputError(f"{what} has shape {arr.shape}; the model takes {shape} ({spec['dtype']})")
        return np.ascontiguousarray(arr.reshape(shape), dtype=spec["dtype"]).tobytes()

    def _cost(self, raw: int) -> float:
        return raw / 1000.0 if self.cost_unit == "ns" else float(raw)

    @property
    def cost_name(self) -> str:
        return "microseconds" if self.cost_unit == "ns" else self.cost_unit

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
        self.last_cost = self._cost(cost)
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
        self.last_cost = self._cost(struct.unpack("<Q", body[-8:])[0])
        return np.frombuffer(body[:-8], dtype=out["dtype"]).reshape(out["shape"]).copy()

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
        """Overwrite trainable parameters (and optimizer state, when given) on the device."""
        block = bytearray(self._block())
        for s in (*self.metadata["trainable"], *self.metadata["optimizer_state"]):
            if s["name"] in values:
                value = np.asarray(values[s["name"]])
                if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
                    raise InputError(f"{s['name']} holds inf/NaN values; the device keeps its own")
                block[s["offset"]:s["offset"] + s["bytes"]] = self._tensor(value, s, s["name"])
        self._call(b"S", bytes(block))

    def reset(self) -> None:
        self._call(b"R")

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
