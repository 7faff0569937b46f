"""The device protocol on a hostile or broken link: random, truncated and mutated frames against the
host program under ASan + UBSan and against QEMU. No crash, no hang (every read has a deadline), no
byte of the RAM block (parameters, optimizer state) changed by a refused frame, and a valid frame
after the garbage is answered.

The frames are built here from the protocol's description (tinytrain_protocol.h), not with the
session's code; the expected status of each comes from the same description."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
from conftest import require_tools

from tests.conftest import small_step_artifact
from tvm_tinytrain import micro
from tvm_tinytrain.errors import InputError
from tvm_tinytrain.micro import DeviceError
from tvm_tinytrain.micro.transport import LinkTimeout, PipeTransport

REQ, RESP = b"\xa5\x5a", b"\x5a\xa5"
FIXED = {"I": 0, "G": 0, "R": 0, "M": 0, "W": 0, "E": 0, "Q": 0, "L": 4}  # payload lengths; T, P, S below


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    return small_step_artifact(root), root


@pytest.fixture(scope="module")
def host(artifact):
    require_tools("gcc", "make")
    art, root = artifact
    project = micro.create_project(art, "host", root / "host", {"sanitize": "1"})
    project.build()
    return project


@pytest.fixture(scope="module")
def qemu(artifact):
    require_tools("arm-none-eabi-gcc", "make", "qemu-system-arm")
    art, root = artifact
    project = micro.create_project(art, "qemu_cortex_m7", root / "qemu")
    project.build()
    return project


class Raw:
    """A device program driven frame by frame, with the protocol written out again here."""

    def __init__(self, project: micro.Project, timeout: float):
        self.link = PipeTransport(project._fill(project.template["run"]), project.path)
        self.timeout, self.buf, self.id = timeout, bytearray(), 0
        meta = project.metadata
        self.meta = meta
        self.input, self.label = meta["input"]["bytes"], meta["label"]["bytes"]
        tensors = (*meta["trainable"], *meta["optimizer_state"])
        self.ram = max(-(-(s["offset"] + s["bytes"]) // 16) * 16 for s in tensors)
        self.chunk = min(meta["memory"]["arena_bytes"], self.ram) & ~3
        self.lengths = {**FIXED, "T": self.input + self.label, "P": self.input}
        self.filler = bytes(max(self.input + self.label, self.chunk + 4) + 32)
        self.link.open()

    def frame(self, cmd: str | int, payload: bytes = b"", *, length=None, crc_ok=True,
              rid=None) -> tuple[bytes, int]:
        if rid is None:
            self.id = (self.id + 1) & 0xFF
            rid = self.id
        code = cmd if isinstance(cmd, int) else ord(cmd)
        head = bytes([code, rid]) + struct.pack("<I", len(payload) if length is None else length)
        crc = zlib.crc32(head + payload) ^ (0 if crc_ok else 0x5A5A5A5A)
        return REQ + head + payload + struct.pack("<I", crc), rid

    def take(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self.buf += self.link.read(n - len(self.buf), deadline)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def response(self) -> tuple[int, int, bytes]:
        deadline = time.monotonic() + self.timeout
        assert self.take(2, deadline) == RESP
        status, rid, length = struct.unpack("<BBI", self.take(6, deadline))
        body = self.take(length, deadline)
        (crc,) = struct.unpack("<I", self.take(4, deadline))
        assert crc == zlib.crc32(struct.pack("<BBI", status, rid, length) + body)
        return status, rid, body

    def until(self, rid: int) -> tuple[int, bytes, list[int]]:
        """Responses up to the one with id ``rid``: its status and payload, the others' statuses."""
        others = []
        while True:
            status, got, body = self.response()
            if got == rid:
                return status, body, others
            others.append(status)

    def call(self, cmd, payload=b"", **kw) -> tuple[int, bytes]:
        data, rid = self.frame(cmd, payload, **kw)
        self.link.write(data)
        status, body, others = self.until(rid)
        assert not others, others
        return status, body

    def block(self) -> bytes:
        status, body = self.call("G")
        assert status == 0 and len(body) == self.ram
        return body

    def expected(self, cmd: int, length: int, crc_ok: bool) -> int:
        """The status tinytrain_protocol.h promises for a frame's header and CRC."""
        name = chr(cmd)
        if name == "S":
            fits = 4 < length <= self.chunk + 4 and length % 4 == 0
            return (0 if crc_ok else 1) if fits else 2
        if name not in self.lengths:
            return 3
        return 2 if length != self.lengths[name] else 0 if crc_ok else 1

    def close(self) -> int:
        self.link.close()
        return self.link.returncode


KINDS = ("random", "header", "label", "rate", "set", "stray", "truncated", "mutated", "nonfinite")


def _bytes(rng, n: int) -> bytes:
    return rng.integers(0, 256, n, dtype=np.uint8).tobytes()


def _sample(rng, raw: Raw) -> bytes:
    return rng.standard_normal(raw.input // 4).astype(np.float32).tobytes()


def _fuzz(raw: Raw, frames: int, seed: int) -> dict[str, int]:
    """Send ``frames`` hostile frames; after each, the RAM block must be as it was. Counts by kind."""
    rng = np.random.default_rng(seed)
    reference = raw.block()
    counts: dict[str, int] = {}
    label_dtype = raw.meta["label"]["dtype"]
    block = (*raw.meta["trainable"], *raw.meta["optimizer_state"])
    float_tensors = [s for s in block if s["dtype"] == "float32"]
    lr = next(s for s in raw.meta["optimizer_state"] if s["name"] == "learning_rate")
    for i in range(frames):
        kind = KINDS[i % len(KINDS)]
        counts[kind] = counts.get(kind, 0) + 1
        if kind == "random":  # random bytes without the magic's first byte, then a valid frame
            junk = _bytes(rng, int(rng.integers(1, 64))).replace(b"\xa5", b"")
            raw.link.write(junk)
        elif kind == "stray":  # one stray byte, even the magic's first, glued to the next frame
            raw.link.write(bytes([0xA5 if i % 2 else int(rng.integers(0, 256))]))
        elif kind == "header":  # any command, any length (0xFFFFFFF0 too), right or wrong CRC
            cmd = int(rng.choice([*b"IGMPTSLRWEQ", *rng.integers(0, 256, 4)]))
            right = raw.lengths.get(chr(cmd), raw.chunk + 4)
            length = int(rng.choice([0, right, right + 1, max(right - 1, 0), 0xFFFFFFF0, 0xFFFFFFFF,
                                     int(rng.integers(0, 1 << 31))]))
            crc_ok = bool(rng.integers(0, 2)) and chr(cmd) in "IGMP"  # never a valid state change
            expect = raw.expected(cmd, length, crc_ok)
            # a payload only where the device reads one: a refused header's bytes are not consumed
            payload = b"" if expect in (2, 3) else _bytes(rng, length)
            if chr(cmd) == "P" and expect == 0:
                payload = _sample(rng, raw)
            data, rid = raw.frame(cmd, payload, length=length, crc_ok=crc_ok)
            if expect in (2, 3):
                data = data[:8]  # the header alone
            raw.link.write(data)
            status, _, others = raw.until(rid)
            assert not others and status == expect, (chr(cmd), length, crc_ok, status)
        elif kind == "label":  # out of range for the 5 classes: refused by the C step itself (status 7)
            value = int(rng.choice([5, 10, 11, -1, -100, 1 << 20, 1 << 40, -(1 << 63), (1 << 63) - 1]))
            status, body = raw.call("T", _sample(rng, raw) + np.array([value], label_dtype).tobytes())
            assert status == 7 and struct.unpack("<fQI", body)[2] == 4, (value, status)
        elif kind == "rate":
            value = float(rng.choice([np.nan, np.inf, -np.inf, -1.0, -1e-30]))
            assert raw.call("L", struct.pack("<f", value))[0] == 6, value
        elif kind == "set":  # an 'S' chunk with a wrong CRC, out of bounds, or a bad learning rate
            choice = i % 4
            offset = lr["offset"] & ~3
            chunk = bytearray(raw.block()[offset:offset + 4])
            if choice == 0:  # a whole valid-looking chunk of new values, wrong CRC
                values = rng.standard_normal(raw.chunk // 4).astype(np.float32)
                payload = struct.pack("<I", 0) + values.tobytes()
                assert raw.call("S", payload, crc_ok=False)[0] == 1
            elif choice == 1:  # offsets out of the RAM block, or not on 4 bytes
                bad = int(rng.choice([raw.ram, raw.ram - 4 + 8, 0xFFFFFFFC, 2, 1 << 31]))
                assert raw.call("S", struct.pack("<I", bad) + bytes(8))[0] == 2, bad
            else:
                chunk[:] = struct.pack("<f", [np.nan, -1.0][choice - 2])
                status, body = raw.call("S", struct.pack("<I", offset) + bytes(chunk))
                assert status == 6
        elif kind == "nonfinite":  # an 'S' chunk with a NaN or inf float; a sample with NaN
            if i % 2:
                s = float_tensors[int(rng.integers(0, len(float_tensors)))]
                chunk = bytearray(raw.block()[s["offset"]:s["offset"] + 16])
                chunk[:4] = struct.pack("<f", [np.nan, np.inf, -np.inf][i % 3])
                status, body = raw.call("S", struct.pack("<I", s["offset"]) + bytes(chunk))
                assert status in (6, 8) and body, status
            else:
                x = np.frombuffer(_sample(rng, raw), np.float32).copy()
                x[int(rng.integers(0, x.size))] = np.nan
                status, body = raw.call("T", x.tobytes() + np.array([1], label_dtype).tobytes())
                assert status == 5 and struct.unpack("<fQI", body)[2] == 2
        else:  # a frame cut short, or one with flipped bytes: then zeros finish whatever was read
            cmd = "TSLGP"[i % 5]
            payload = {"T": _sample(rng, raw) + np.array([1], label_dtype).tobytes(), "P": _sample(rng, raw),
                       "L": struct.pack("<f", 0.01), "G": b"",
                       "S": struct.pack("<I", 0) + bytes(raw.chunk)}[cmd]
            data = bytearray(raw.frame(cmd, payload)[0])
            if kind == "truncated":
                data = data[:int(rng.integers(1, len(data)))]
            else:
                for at in rng.integers(2, len(data), int(rng.integers(1, 4))):
                    data[at] ^= int(rng.integers(1, 256))
            raw.link.write(bytes(data) + raw.filler)
            status, body, others = raw.until(_send_get(raw))
            assert status == 0 and all(s != 0 for s in others), others
            assert body == reference, f"{kind} frame {i} changed the RAM block"
            continue
        assert raw.block() == reference, f"{kind} frame {i} changed the RAM block"
    # the device still trains after all that
    x = _sample(rng, raw)
    status, body = raw.call("T", x + np.array([2], label_dtype).tobytes())
    assert status == 0 and raw.block() != reference
    return counts


def _send_get(raw: Raw) -> int:
    data, rid = raw.frame("G")
    raw.link.write(data)
    return rid


def test_host_program_under_sanitizers_survives_hostile_frames(host):
    raw = Raw(host, timeout=20.0)
    try:
        counts = _fuzz(raw, 360, seed=17)
        assert raw.call("Q")[0] == 0
    finally:
        code = raw.close()
    assert code == 0, raw.link.died() if raw.link.process else f"exit code {code}"
    print("host frames by kind:", counts)


def test_qemu_survives_hostile_frames(qemu):
    raw = Raw(qemu, timeout=30.0)
    try:
        counts = _fuzz(raw, 90, seed=18)
        assert raw.call("Q")[0] == 0
    finally:
        code = raw.close()
    assert code == 0
    print("QEMU frames by kind:", counts)


def test_session_times_out_names_the_command_and_resynchronises(host):
    with host.session(timeout=2.0) as dev:
        before = {**dev.params(), **dev.optimizer_state()}
        # half a frame: the device waits for the rest and swallows the next request
        dev.transport.write(REQ + b"T\x00" + struct.pack("<I", 264) + bytes(10))
        start = time.monotonic()
        with pytest.raises(DeviceError, match=r"did not answer 'G' \(get parameters\) within 2 s; "
                                              r"the link is resynchronised"):
            dev.params()
        assert time.monotonic() - start < 15
        after = {**dev.params(), **dev.optimizer_state()}  # and the session goes on
        assert all(before[n].tobytes() == after[n].tobytes() for n in before)
        # labels are checked on the host, and the device refuses them by itself too
        x = np.zeros((1, 1, 8, 8), np.float32)
        for bad in (5, 10, -1, -100, 1 << 20):
            with pytest.raises(InputError, match=r"0\.\.4"):
                dev.train_step(x, np.array([bad]))
            dev._call(b"T", x.tobytes() + np.array([bad], np.int64).tobytes(), allow=(7,))
            assert dev.last_status == 7
        with pytest.raises(InputError, match="inf/NaN"):
            dev.set_params({"linear4.bias": np.full(5, np.nan, np.float32)})
        assert all(before[n].tobytes() == v.tobytes() for n, v in dev.params().items())
    assert dev.returncode == 0


def test_a_program_that_stops_answering_is_a_one_line_error(host, tmp_path):
    """A device that hangs: the session gives up after its timeout and says to reset it."""
    from tvm_tinytrain.micro.session import Session

    hang = tmp_path / "hang.sh"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    session = Session(PipeTransport([str(hang)], tmp_path), host.path, "ns", timeout=1.0)
    start = time.monotonic()
    with pytest.raises(DeviceError) as err:
        with session:
            pass
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "\n" not in message and "did not answer 'I' (info) within 1 s" in message and "reset it" in message


def test_link_read_has_a_deadline(host):
    link = PipeTransport(host._fill(host.template["run"]), host.path)
    link.open()
    try:
        with pytest.raises(LinkTimeout):
            link.read(1, time.monotonic() + 0.3)
    finally:
        link.close()


def test_serial_transport_over_a_pty_trains_as_the_pipe_does(host):
    """The serial link against a pseudo-terminal: the host program on the master end, pyserial on
    the slave's path. The same steps give the same losses and parameters as over a pipe."""
    import os
    import subprocess

    from tvm_tinytrain.micro.session import Session
    from tvm_tinytrain.micro.transport import SerialTransport

    rng = np.random.default_rng(5)
    xs, ys = rng.standard_normal((4, 1, 1, 8, 8)).astype(np.float32), rng.integers(0, 5, 4)
    with host.session() as dev:
        dev.reset()
        expected = [dev.train_step(x, y) for x, y in zip(xs, ys)], dev.params()
    master, slave = os.openpty()
    program = subprocess.Popen([str(host.binary)], stdin=master, stdout=master, cwd=host.path,
                               env={**os.environ, "TINYTRAIN_SLOTS": str(host.path / "serial.slots")})
    try:
        with Session(SerialTransport(os.ttyname(slave), 115200), host.path, "ns", timeout=20) as dev:
            assert dev.boot.source == "compiled-in"
            losses = [dev.train_step(x, y) for x, y in zip(xs, ys)]
            params = dev.params()
            assert dev.save() == 1
        assert program.wait(timeout=20) == 0  # 'Q' ended it
    finally:
        if program.poll() is None:
            program.kill()
        os.close(master)
        os.close(slave)
    assert losses == expected[0]
    assert all(params[n].tobytes() == expected[1][n].tobytes() for n in params)


def test_serial_port_that_does_not_exist_is_named(host, monkeypatch):
    with pytest.raises(DeviceError, match=r"^serial port /dev/ttyNOPE0 does not exist; ports here: "):
        with host.session(serial_port="/dev/ttyNOPE0"):
            pass
    import sys

    monkeypatch.setitem(sys.modules, "serial", None)  # pyserial not installed
    with pytest.raises(DeviceError, match=r"pip install pyserial"):
        with host.session(serial_port="/dev/ttyNOPE0"):
            pass
