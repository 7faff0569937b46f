"""Byte links to a device program: a pipe to a process (host, QEMU) or a serial port (a board).

A transport moves bytes and never blocks past a deadline: ``read(n, deadline)`` returns between 1
and ``n`` bytes, or raises :class:`LinkTimeout` when ``deadline`` (``time.monotonic()``) passes, or
:class:`DeviceError` when the link is gone. Frames, ids and resynchronisation are the session's.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

from .project import DeviceError


class LinkTimeout(Exception):
    """Nothing arrived before the deadline (the session turns it into a DeviceError naming the command)."""


class PipeTransport:
    """A device program started as a process, speaking over its stdin / stdout."""

    def __init__(self, cmd: list[str], cwd: str | Path):
        self.cmd, self.cwd = [str(c) for c in cmd], Path(cwd)
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self._stderr = None

    def __str__(self) -> str:
        return f"the device program ({os.path.basename(self.cmd[0])})"

    def open(self) -> None:
        self._stderr = tempfile.TemporaryFile()
        try:
            # its own session: a terminal's Ctrl-C is tinytrain's to handle (stop after the step, save)
            self.process = subprocess.Popen(self.cmd, cwd=self.cwd, stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0,
                                            start_new_session=True)
        except OSError as err:
            raise DeviceError(f"cannot start {' '.join(self.cmd)}: {err.strerror}; build the project first") \
                from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[self.process.stdin.write(view):]
        except (BrokenPipeError, ValueError):
            raise DeviceError(self.died()) from None

    def read(self, n: int, deadline: float) -> bytes:
        fd = self.process.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                data = os.read(fd, n)
                if not data:
                    raise DeviceError(self.died())
                return data

    def died(self) -> str:
        """What a user reads when the program is gone: its exit code and the end of its stderr."""
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return "the device program stopped answering and does not exit"
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace").strip()[-2000:]
        return f"the device program stopped (exit code {self.process.returncode}){': ' + err if err else ''}"

    def close(self, wait: bool = True) -> None:
        """Close its stdin (end of input) and wait for the program, killing it when it does not end."""
        p = self.process
        if p is None:
            return
        try:
            p.stdin.close()
        except OSError:
            pass
        try:
            p.wait(timeout=30 if wait else 0.5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        p.stdout.close()
        self._stderr.close()
        self.returncode = p.returncode
        self.process = None


class SerialTransport:
    """A board on a serial port (pyserial), e.g. a NUCLEO's ST-LINK virtual COM port."""

    def __init__(self, port: str, baudrate: int = 115200):
        self.port, self.baudrate = str(port), int(baudrate)
        self.serial = None
        self.returncode: int | None = None

    def __str__(self) -> str:
        return f"the device on {self.port}"

    def open(self) -> None:
        try:
            import serial
            from serial.tools import list_ports
        except ImportError:
            raise DeviceError("the serial link needs pyserial: pip install pyserial") from None
        if not os.path.exists(self.port):
            ports = sorted(p.device for p in list_ports.comports())
            raise DeviceError(f"serial port {self.port} does not exist; ports here: "
                              f"{', '.join(ports) if ports else 'none (is the board plugged in?)'}")
        try:
            self.serial = serial.Serial(self.port, self.baudrate, timeout=0.1, write_timeout=30)
        except (serial.SerialException, OSError, ValueError) as err:
            raise DeviceError(f"cannot open serial port {self.port}: {err}") from None
        self.serial.reset_input_buffer()

    def write(self, data: bytes) -> None:
        import serial

        try:
            self.serial.write(data)
            self.serial.flush()
        except (serial.SerialException, OSError) as err:
            raise DeviceError(f"writing to serial port {self.port} failed: {err}") from None

    def read(self, n: int, deadline: float) -> bytes:
        import serial

        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LinkTimeout
            self.serial.timeout = min(left, 0.5)
            try:
                waiting = self.serial.in_waiting
                data = self.serial.read(max(1, min(n, waiting)))
            except (serial.SerialException, OSError) as err:
                raise DeviceError(f"reading from serial port {self.port} failed: {err}") from None
            if data:
                return data

    def died(self) -> str:
        return f"the device on {self.port} stopped answering"

    def close(self, wait: bool = True) -> None:
        if self.serial is not None:
            self.serial.close()
            self.serial = None
