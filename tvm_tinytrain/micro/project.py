"""Template projects: ``create_project`` copies a template, the shared device code and an artifact
into a folder that builds by itself; :class:`Project` builds, flashes and opens a session."""


from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import files
from ..codegen.artifact import Artifact
from ..errors import InputError, OutputError, TinyTrainError

TEMPLATES = Path(__file__).resolve().parents[2] / "microtvm_projects"
PROTOCOL_VERSION = 3
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
        raise InputError(f"unknown template {template!r}; choose one of {', '.join(template_names())} "
                         f"or a folder with a template.json")
    return path


def check_tools(template: dict, needed: list[str] | None = None) -> None:
    """Raise :class:`ToolMissingError` naming what to install when a tool is not on PATH."""
    tools = template.get("tools", {})
    missing = [f"{name} ({how})" for name, how in tools.items()
               if (needed is None or name in needed) and shutil.which(name) is None]
    if missing:
        raise ToolMissingError("missing: " + "; ".join(missing))


@dataclass
class Project:
    """A project folder made from a template: ``build()``, ``flash()``, ``session()``."""

    path: Path
    template: dict
    options: dict

    def _make_vars(self) -> list[str]:
        names = self.template.get("options", {})
        return [f"{names[k]}={v}" for k, v in self.options.items()]

    def build(self) -> Path:
        """Run the template's build (``make``) with its options; returns the program's path."""
        check_tools(self.template, [t for t in self.template.get("tools", {}) if t != "qemu-system-arm"])
        cmd = [*self.template["build"], *self._make_vars()]
        result = subprocess.run(cmd, cwd=self.path, capture_output=True, text=True)
        if result.returncode != 0:
            raise TinyTrainError(f"building {self.path} failed ({' '.join(cmd)}):\n"
                                 f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        self.build_log = result.stdout + result.stderr
        return self.binary

    @property
    def binary(self) -> Path:
        return self.path / self.template["binary"]

    def flash(self) -> None:
        """Host and QEMU need no flashing: check the program is built and the runner installed."""
        if not self.binary.is_file():
            raise TinyTrainError(f"{self.binary} does not exist: call project.build() first")
        check_tools(self.template)

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

    def session(self):
        """A :class:`~tvm_tinytrain.micro.session.Session` with the running program."""
        from .session import Session

        self.flash()
        cmd = [a.replace("{binary}", str(self.binary)) for a in self.template["run"]]
        return Session(cmd, self.path, self.template.get("cost_unit", ""))


def is_project(path: Path) -> bool:
    """Whether ``path`` is a project folder ``create_project`` made (it holds the marker file)."""
    return (Path(path) / PROJECT_MARKER).is_file()


def create_project(artifact: Artifact | str | Path, template: str | Path, directory: str | Path,
                   options: dict | None = None) -> Project:
    """Copy ``template``, the protocol code and ``artifact`` into ``directory``, whole or not at all.

    ``directory`` must be new, empty or a project this function made (marked ``.tinytrain-project``),
    which is replaced only once the new one is complete; anything else, and the current folder, home,
    ``/`` or a parent of the current folder, is refused with an OutputError before anything is read."""
    directory = files.check_folder(directory, is_project, "tinytrain project")
    if not isinstance(artifact, Artifact):
        artifact = Artifact.load(artifact)
    source = _template_dir(template)
    if source.resolve() in (directory.resolve(), *directory.resolve().parents):
        raise OutputError(f"{directory} is inside template {source}: name a folder outside it")
    spec = json.loads((source / "template.json").read_text())
    options = dict(options or {})
    unknown = set(options) - set(spec.get("options", {}))
    if unknown:
        raise InputError(f"template {source.name} has no option {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(spec.get('options', {})) or 'none'}")
    with files.replacing_folder(directory, is_project, "tinytrain project") as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        shutil.copytree(TEMPLATES / "common", tmp / "common")
        artifact.write_into(tmp / "model")
        (tmp / PROJECT_MARKER).write_text(json.dumps({"template": source.name}) + "\n")
    return Project(directory, spec, options)


