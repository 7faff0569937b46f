"""Template projects: ``create_project`` copies a template, the shared device code and an artifact
into a folder that builds by itself; :class:`Project` builds, flashes and opens a session;
``open_project`` reopens a folder ``create_project`` made.

A template is a folder with a ``template.json``; its fields:

- ``description``: one line, shown by ``tinytrain micro list-templates``.
- ``tools``: ``{command: how to install it}``, every program the template needs on PATH.
  ``build_tools`` (optional): the subset ``build`` needs (default: all of ``tools``).
- ``env`` (optional): ``{VARIABLE: how to set it}``, environment variables build and flash need
  (zephyr: ``ZEPHYR_BASE``).
- ``options``: ``{name: {"variable": V, "default": D, "help": H, "choices": [...]}}``. A value the
  user gives becomes one more argument of the build command, ``option_format`` filled in (default
  ``"{variable}={value}"``, a make variable; a CMake build uses ``"-D{variable}={value}"``). Only
  options the user gave are passed: ``default`` is what the build does without it (shown to the
  user). ``choices`` (optional) lists the accepted values. All values are strings.
- ``boards`` (optional): the boards the template builds for, the first one the default; only such a
  template takes ``--board``.
- ``build``: the command, run in the project folder (``["make"]``, ``["west", "build", "-b",
  "{board}", ...]``). ``binary``: what it makes, relative to the project folder.
- ``flash`` (optional): the command that puts the program on the board (``["west", "flash"]``);
  without it (host, QEMU) flashing checks the program is built and ``tools`` are installed.
- ``run`` (optional): the command that starts the device program speaking the protocol over its
  stdin / stdout (host, QEMU); without it the device is reached on a serial port
  (``baudrate``, default 115200). ``cost_unit``: the unit of a step's cost, ``"ns"``,
  ``"instructions"`` or ``"cycles"``. ``size_tool`` (optional): ``size`` for the program's ELF.

Placeholders in ``build``, ``flash`` and ``run``: ``{binary}``, ``{board}``, ``{serial_port}``.
The project folder holds a copy of ``template.json`` and the marker ``.tinytrain-project``, JSON
``{"template": NAME, "board": B, "options": {...}}``: build, flash and run need only the folder.
"""


from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import files
from ..codegen.artifact import Artifact
from ..errors import InputError, OutputError, TinyTrainError

TEMPLATES = Path(__file__).resolve().parents[2] / "microtvm_projects"
PROJECT_MARKER = ".tinytrain-project"  # in every project create_project makes


class ToolMissingError(TinyTrainError):
    """A toolchain or emulator a template needs is not installed."""


class DeviceError(TinyTrainError):
    """The device answered with an error, or stopped answering."""


def template_names() -> list[str]:
    return sorted(p.parent.name for p in TEMPLATES.glob("*/template.json"))


def _template_dir(template: str | Path) -> Path:
    path = Path(template)
    if not (path / "template.json").is_file():
        path = TEMPLATES / str(template)
    if not (path / "template.json").is_file():
        raise InputError(f"unknown template {str(template)!r}; choose one of {', '.join(template_names())} "
                         f"or a folder with a template.json")
    return path


def _read_spec(path: Path) -> dict:
    try:
        spec = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"cannot read {path}: {err}; restore it from the template") from None
    if not isinstance(spec, dict):
        raise InputError(f"{path} is not a JSON object; restore it from the template")
    return spec


@dataclass(frozen=True)
class TemplateOption:
    """One ``--option`` of a template (see the module docstring)."""

    name: str
    variable: str
    default: str | None = None
    help: str = ""
    choices: tuple[str, ...] = ()


def template_options(spec: dict) -> dict[str, TemplateOption]:
    """The options of a template.json (an older plain ``{name: VARIABLE}`` entry is read too)."""
    out = {}
    for name, entry in spec.get("options", {}).items():
        if isinstance(entry, str):
            entry = {"variable": entry}
        default = entry.get("default")
        out[name] = TemplateOption(name, entry["variable"], None if default is None else str(default),
                                   entry.get("help", ""), tuple(str(c) for c in entry.get("choices", ())))
    return out


@dataclass(frozen=True)
class TemplateInfo:
    """What ``tinytrain micro list-templates`` shows of one template."""

    name: str
    path: Path
    description: str
    options: dict[str, TemplateOption]
    boards: tuple[str, ...]


def template_info(template: str | Path) -> TemplateInfo:
    path = _template_dir(template)
    spec = _read_spec(path / "template.json")
    return TemplateInfo(path.name, path, spec.get("description", ""), template_options(spec),
                        tuple(spec.get("boards", ())))


def list_templates() -> list[TemplateInfo]:
    return [template_info(name) for name in template_names()]


def check_tools(template: dict, needed: list[str] | None = None) -> None:
    """Raise :class:`ToolMissingError` naming what to install when a tool is not on PATH (or an
    environment variable of ``env`` is not set)."""
    tools = template.get("tools", {})
    missing = [f"{name} ({how})" for name, how in tools.items()
               if (needed is None or name in needed) and shutil.which(name) is None]
    missing += [f"environment variable {name} ({how})" for name, how in template.get("env", {}).items()
                if not os.environ.get(name)]
    if missing:
        raise ToolMissingError("missing: " + "; ".join(missing))


def _checked_options(name: str, spec: dict, options: dict) -> dict[str, str]:
    known = template_options(spec)
    unknown = sorted(str(k) for k in set(options) - set(known))
    if unknown:
        raise InputError(f"template {name} has no option {', '.join(unknown)}; "
                         f"it takes {', '.join(known) or 'none'}")
    out = {}
    for key, value in options.items():
        value = str(value)
        choices = known[key].choices
        if choices and value not in choices:
            raise InputError(f"option {key}={value} of template {name} must be one of {', '.join(choices)}")
        out[key] = value
    return out


def _checked_board(name: str, spec: dict, board: str | None) -> str | None:
    boards = [str(b) for b in spec.get("boards", [])]
    if not boards:
        if board is not None:
            raise InputError(f"template {name} has no boards: drop --board (templates with boards: "
                             f"{', '.join(t.name for t in list_templates() if t.boards) or 'none'})")
        return None
    if board is None:
        return boards[0]
    if board not in boards:
        raise InputError(f"template {name} has no board {board!r}; choose one of {', '.join(boards)}")
    return board


@dataclass
class Project:
    """A project folder made from a template: ``build()``, ``flash()``, ``session()``."""

    path: Path
    template: dict
    options: dict
    board: str | None = None
    template_name: str = ""
    build_log: str = field(default="", repr=False)

    def _fill(self, args: list[str], serial_port: str | None = None) -> list[str]:
        values = {"{binary}": str(self.binary), "{board}": self.board or "",
                  "{serial_port}": serial_port or ""}
        out = []
        for arg in args:
            for key, value in values.items():
                arg = arg.replace(key, value)
            out.append(arg)
        return out

    def _option_args(self) -> list[str]:
        known = template_options(self.template)
        form = self.template.get("option_format", "{variable}={value}")
        return [form.format(variable=known[k].variable, value=v) for k, v in self.options.items()]

    def build(self) -> Path:
        """Run the template's build (``make``) with its options; returns the program's path."""
        tools = self.template.get("tools", {})
        check_tools(self.template, self.template.get("build_tools", list(tools)))
        cmd = [*self._fill(self.template["build"]), *self._option_args()]
        result = subprocess.run(cmd, cwd=self.path, capture_output=True, text=True)
        if result.returncode != 0:
            raise TinyTrainError(f"building {self.path} failed ({' '.join(cmd)}):\n"
                                 f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        self.build_log = result.stdout + result.stderr
        return self.binary

    @property
    def binary(self) -> Path:
        return self.path / self.template["binary"]

    @property
    def metadata(self) -> dict:
        """The artifact's ``metadata.json`` (input, output, loss, memory...), from ``model/``."""
        path = self.path / "model" / "metadata.json"
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise InputError(f"cannot read {path} ({err}); make the project again") from None

    def check_built(self) -> None:
        """Raise unless the program is built and every tool of the template is installed."""
        if not self.binary.is_file():
            raise TinyTrainError(f"{self.binary} does not exist: build the project first "
                                 f"(tinytrain micro build {self.path})")
        check_tools(self.template)

    def flash(self, serial_port: str | None = None) -> None:
        """Run the template's ``flash`` command (a board); host and QEMU need no flashing: check the
        program is built and the runner installed."""
        if serial_port is not None and not Path(serial_port).exists():
            raise InputError(f"serial port {serial_port} does not exist; name the board's port "
                             f"(e.g. /dev/ttyACM0)")
        self.check_built()
        if "flash" not in self.template:
            return
        cmd = self._fill(self.template["flash"], serial_port)
        result = subprocess.run(cmd, cwd=self.path, capture_output=True, text=True)
        if result.returncode != 0:
            raise TinyTrainError(f"flashing {self.path} failed ({' '.join(cmd)}):\n"
                                 f"{result.stdout[-3000:]}{result.stderr[-3000:]}")

    def static_ram(self) -> dict[str, int]:
        """Static SRAM of the built program (.data + .bss, the reserved stack apart), from the ELF."""
        tool = self.template.get("size_tool")
        if tool is None:
            raise TinyTrainError("this template's program has no fixed memory map (a host process)")
        out = subprocess.run([tool, "-A", str(self.binary)], capture_output=True, text=True,
                             check=True).stdout
        sizes = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0].startswith(".") and parts[1].isdigit():
                sizes[parts[0]] = int(parts[1])
        nm = subprocess.run([tool.replace("size", "nm"), "-S", str(self.binary)], capture_output=True,
                            text=True, check=True).stdout
        symbols = {}
        for line in nm.splitlines():
            parts = line.split()
            if len(parts) == 4:
                symbols[parts[3]] = int(parts[1], 16)
        return {"data": sizes.get(".data", 0), "bss": sizes.get(".bss", 0),
                "stack_reserved": sizes.get(".stack", 0),
                "arena": symbols.get("tinytrain_arena", 0), "params": symbols.get("tinytrain_ram", 0)}

    def session(self, serial_port: str | None = None, timeout: float = 30.0):
        """A :class:`~tvm_tinytrain.micro.session.Session` with the device: the template's ``run``
        program over a pipe (host, QEMU), or the board on ``serial_port`` (templates without
        ``run``). ``timeout``: seconds to wait for each answer."""
        from .session import Session
        from .transport import PipeTransport, SerialTransport

        if serial_port is None and "run" not in self.template:
            raise InputError(f"the {self.template_name or 'project'}'s device is reached on a serial port: "
                             "name it (--serial-port /dev/ttyACM0)")
        if serial_port is not None:
            transport = SerialTransport(serial_port, int(self.template.get("baudrate", 115200)))
        else:
            self.check_built()
            transport = PipeTransport(self._fill(self.template["run"]), self.path)
        return Session(transport, self.path, self.template.get("cost_unit", ""), timeout=timeout)


def is_project(path: Path) -> bool:
    """Whether ``path`` is a project folder ``create_project`` made (it holds the marker file)."""
    return (Path(path) / PROJECT_MARKER).is_file()


def open_project(path: str | Path) -> Project:
    """The project ``create_project`` made in ``path``, with its template, options and board."""
    path = Path(path).absolute()
    if not is_project(path):
        why = "does not exist" if not path.exists() else f"is not a tinytrain project (no {PROJECT_MARKER})"
        raise InputError(f"{path} {why}; make one with tinytrain micro create-project")
    try:
        marker = json.loads((path / PROJECT_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        marker = None
    if not isinstance(marker, dict):
        raise InputError(f"{path / PROJECT_MARKER} is not readable JSON; make the project again")
    spec = _read_spec(path / "template.json")
    options = {str(k): str(v) for k, v in (marker.get("options") or {}).items()}
    return Project(path, spec, options, marker.get("board"), str(marker.get("template", "")))


def create_project(artifact: Artifact | str | Path, template: str | Path, directory: str | Path,
                   options: dict | None = None, *, board: str | None = None, force: bool = False) -> Project:
    """Copy ``template``, the protocol code and ``artifact`` into ``directory``, whole or not at all.

    An existing ``directory`` is refused unless ``force``; even then it must be empty or a project
    this function made (marked ``.tinytrain-project``), which is replaced only once the new one is
    complete. The current folder, home, ``/`` and the parents of the current folder are always
    refused. Errors (OutputError, InputError) come before anything is written."""
    directory = files.check_folder(directory, is_project, "tinytrain project")
    if directory.exists() and not force:
        raise OutputError(f"{directory} already exists: pass --force (force=True) to replace it "
                          f"(only an empty folder or a project create-project made is ever replaced)")
    source = _template_dir(template)
    if source.resolve() in (directory.resolve(), *directory.resolve().parents):
        raise OutputError(f"{directory} is inside template {source}: name a folder outside it")
    spec = _read_spec(source / "template.json")
    options = _checked_options(source.name, spec, dict(options or {}))
    board = _checked_board(source.name, spec, board)
    if not isinstance(artifact, Artifact):
        artifact = Artifact.load(artifact)
    marker = {"template": source.name, "board": board, "options": options}
    with files.replacing_folder(directory, is_project, "tinytrain project") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        shutil.copytree(TEMPLATES / "common", tmp / "common")
        artifact.write_into(tmp / "model")
        (tmp / PROJECT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return Project(directory.absolute(), spec, options, board, source.name)
