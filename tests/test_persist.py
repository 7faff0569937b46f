"""Learned values survive restarts and power loss: the two-slot persistent region
(microtvm_projects/common/tinytrain_persist.c) through the host program (a file beside it) and QEMU
(a host file through semihosting).

The slot layout is read here from its description in tinytrain_persist.h, not with the device's
code: header {magic, model id, sequence, length, crc32} at the slot's start, the RAM block after
it on the next write block (16 bytes by default)."""

from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import require_tools

from tests.conftest import small_step_artifact
from tvm_tinytrain import micro

MAGIC, HEADER, WRITE_BLOCK = 0x54545331, 20, 16
PAYLOAD_AT = -(-HEADER // WRITE_BLOCK) * WRITE_BLOCK
REQ = b"\xa5\x5a"
TOOLS = {"host": ("gcc", "make"), "qemu_cortex_m7": ("arm-none-eabi-gcc", "make", "qemu-system-arm")}
SLOTS = {"host": "tinytrain_host.slots", "qemu_cortex_m7": "tinytrain.slots"}
# the emulated flash delay per programmed block: a save takes ~20-100 ms, long enough to cut it short
DELAY_US = {"host": "200", "qemu_cortex_m7": "10"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("persist")
    return small_step_artifact(root), root


def _project(artifact, template: str, name: str, delay_us: str = "0") -> micro.Project:
    require_tools(*TOOLS[template])
    art, root = artifact
    project = micro.create_project(art, template, root / name)
    old = os.environ.get("FLASH_DELAY_US")
    os.environ["FLASH_DELAY_US"] = delay_us  # a make variable (?=): the build reads it from the environment
    try:
        project.build()
    finally:
        if old is None:
            del os.environ["FLASH_DELAY_US"]
        else:
            os.environ["FLASH_DELAY_US"] = old
    return project


@pytest.fixture(scope="module", params=["host", "qemu_cortex_m7"])
def project(request, artifact):
    return _project(artifact, request.param, request.param)


def _slots(project) -> Path:
    return project.binary.parent / SLOTS[project.template_name]


def _slot(data: bytes, k: int, slot_bytes: int) -> dict:
    """One slot of the region file, decoded from the layout's description."""
    raw = data[k * slot_bytes:(k + 1) * slot_bytes]
    magic, model_id, sequence, length, crc = struct.unpack_from("<5I", raw)
    payload = raw[PAYLOAD_AT:PAYLOAD_AT + length] if length <= slot_bytes - PAYLOAD_AT else b""
    valid = magic == MAGIC and len(payload) == length and \
        crc == zlib.crc32(payload, zlib.crc32(raw[4:16]))
    return {"erased": raw == b"\xff" * slot_bytes, "valid": valid, "sequence": sequence,
            "model_id": model_id, "payload": payload}


def _block(dev) -> bytes:
    return dev._call(b"G")


def _train(dev, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        dev.train_step(rng.standard_normal((1, 1, 8, 8)).astype(np.float32), np.array([rng.integers(0, 5)]))


def test_saves_continue_across_restarts_and_reset_goes_back_to_compiled_in(project):
    _slots(project).unlink(missing_ok=True)
    with project.session() as dev:
        assert dev.boot.source == "compiled-in" and "no save yet" in dev.boot.message
        compiled_in = _block(dev)
        _train(dev, 3, seed=1)
        assert dev.save() == 1
        first = _block(dev)
    with project.session() as dev:
        assert (dev.boot.source, dev.boot.sequence) == ("slot 0", 1)
        assert dev.boot.message == "continuing from slot 0 (save #1)"
        assert _block(dev) == first
        _train(dev, 2, seed=2)
        assert dev.save() == 2
        second = _block(dev)
    data = _slots(project).read_bytes()
    slot_bytes = len(data) // 2
    assert [_slot(data, k, slot_bytes)["payload"] for k in (0, 1)] == [first, second]
    with project.session() as dev:
        assert (dev.boot.source, dev.boot.sequence) == ("slot 1", 2) and _block(dev) == second
        assert dev.save() == 3  # the older slot, 0, is written
        dev.reset()  # R: the RAM block back to the compiled-in values, the saves kept
        assert _block(dev) == compiled_in
        dev.erase_saved()  # E: the next boot starts from the compiled-in values
    with project.session() as dev:
        assert dev.boot.source == "compiled-in" and dev.boot.sequence == 0
        assert _block(dev) == compiled_in
    assert _slots(project).read_bytes() == b"\xff" * len(data)


def test_a_corrupt_or_foreign_slot_falls_back_and_says_so(project):
    _slots(project).unlink(missing_ok=True)
    with project.session() as dev:
        compiled_in = _block(dev)
        _train(dev, 2, seed=3)
        dev.save()
        first = _block(dev)
        _train(dev, 2, seed=4)
        dev.save()
        second = _block(dev)
    path = _slots(project)
    good = path.read_bytes()
    slot_bytes = len(good) // 2
    # a flipped byte in the newest slot's payload: its CRC fails, the other one is loaded
    data = bytearray(good)
    data[slot_bytes + PAYLOAD_AT + 7] ^= 0x40
    path.write_bytes(bytes(data))
    with project.session() as dev:
        assert dev.boot.message == "slot 1 failed its CRC; continuing from slot 0 (save #1)"
        assert _block(dev) == first
    # both corrupt: the compiled-in values
    data[PAYLOAD_AT + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with project.session() as dev:
        assert dev.boot.source == "compiled-in"
        assert dev.boot.message == ("slot 0 failed its CRC, slot 1 failed its CRC; "
                                    "starting from the compiled-in weights")
        assert _block(dev) == compiled_in
    # a slot another artifact wrote (another model id, its own CRC right): never loaded
    data = bytearray(good)
    head = struct.pack("<4I", MAGIC, project.metadata["model_id"] ^ 0x1, 9, len(second))
    crc = zlib.crc32(second, zlib.crc32(head[4:]))
    data[slot_bytes:slot_bytes + HEADER] = head + struct.pack("<I", crc)
    path.write_bytes(bytes(data))
    assert _slot(bytes(data), 1, slot_bytes)["valid"]  # valid by itself: only the model id differs
    with project.session() as dev:
        assert dev.boot.message == "slot 1 holds another model's save; continuing from slot 0 (save #1)"
        assert _block(dev) == first


def _save_frame(rid: int) -> bytes:
    head = b"W" + bytes([rid]) + struct.pack("<I", 0)
    return REQ + head + struct.pack("<I", zlib.crc32(head))


def _kill_points(project, kills: int, seed: int) -> dict[str, int]:
    """Start the program, train a step, ask for a save and SIGKILL the program at a random moment
    while it writes; after each restart the RAM block must be the last completed save or the one
    in flight, bit for bit. Counts of what the kills left."""
    rng = np.random.default_rng(seed)
    path = _slots(project)
    path.unlink(missing_ok=True)
    with project.session() as dev:  # how long a save takes here, to aim the kills
        times = []
        for _ in range(3):
            start = time.monotonic()
            dev.save()
            times.append(time.monotonic() - start)
        window = min(times)  # kills land at a uniform moment in [0, window] after the request
        dev.erase_saved()
    counts = {"kills": 0, "torn slot": 0, "erased slot": 0, "save completed": 0, "save not started": 0,
              "boot: the save in flight": 0, "boot: the last completed save": 0, "boot: compiled-in": 0}
    last, last_seq, in_flight = None, 0, None
    for i in range(kills):
        dev = project.session(timeout=20.0).__enter__()
        block = _block(dev)
        # the block after a restart: the last completed save, or the one in flight if it completed
        if in_flight is not None and block == in_flight:
            last, last_seq = in_flight, last_seq + 1
            counts["boot: the save in flight"] += 1
            assert (dev.boot.sequence, dev.boot.source) == (last_seq, f"slot {(last_seq - 1) % 2}")
        elif last is None:
            counts["boot: compiled-in"] += 1
            assert dev.boot.source == "compiled-in"
        else:
            assert block == last, f"kill {i}: the parameters are neither the last save nor the one in flight"
            assert dev.boot.sequence == last_seq
            counts["boot: the last completed save"] += 1
        _train(dev, 1, seed=i)
        in_flight = _block(dev)
        dev.transport.write(_save_frame(200))
        time.sleep(float(rng.uniform(0.0, window)))
        dev.transport.process.kill()
        dev.transport.close(wait=False)
        counts["kills"] += 1
        data = path.read_bytes()
        target = _slot(data, last_seq % 2, len(data) // 2)  # a save writes the older slot
        # the window follows the machine's speed: about one kill in six lands after the save ended
        window *= 1.02
        if target["valid"] and target["payload"] == in_flight:
            counts["save completed"] += 1
            window *= 0.9 / 1.02
        elif target["erased"]:
            counts["erased slot"] += 1
        elif target["valid"]:
            counts["save not started"] += 1
        else:
            counts["torn slot"] += 1
    return counts


@pytest.mark.parametrize("template", ["host", "qemu_cortex_m7"])  # ~10 s and ~40 s
def test_kill_points_during_saves_leave_the_last_save_or_the_new_one(artifact, template):
    project = _project(artifact, template, f"{template}_kill", DELAY_US[template])
    counts = _kill_points(project, 200, seed=7)
    print(f"{template} kill points:", counts)
    assert counts["kills"] == 200
    assert counts["torn slot"] + counts["erased slot"] >= 120, counts  # most kills landed mid-save
    assert counts["save completed"] >= 5 and counts["boot: the save in flight"] >= 5, counts
