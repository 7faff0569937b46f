"""The compiled artifact: C sources, header and ``metadata.json``, kept in memory until exported.

It is what Model Library Format was to microTVM: a folder (or a ``.tar``) that a
template project (``tvm_tinytrain.micro``) or a user's own build takes as it is::

    include/tinytrain_model.h    the C API
    src/tinytrain_model.c        executor: arena, kernel calls in plan order
    src/tinytrain_kernels.c      TVM's kernels, plain C
    src/tinytrain_params.c       frozen parameters and initial values, const (flash)
    src/tinytrain_math.c         expf / logf, identical on every target
    src/tinytrain_internal.h
    metadata.json                shapes, dtypes, plan, scheme, versions, each file's size
    source.tflite | source.onnx  the model file compiled, byte for byte (``metadata["source"]``:
                                 its name, sha256 and which tensor each parameter came from), for
                                 ``tvm_tinytrain.export_tuned``; binary files are listed in
                                 ``metadata["binary"]``

``export`` writes whole or not at all (``tvm_tinytrain.files``); ``load`` refuses an artifact
with a file missing or cut short.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from ..errors import InputError, OutputError
from ..files import check_file, check_folder, replacing_file, replacing_folder

FORMAT = "tvm-tinytrain artifact"
# what an artifact exported before metadata.json listed its files must hold
REQUIRED = ("include/tinytrain_model.h", "src/tinytrain_internal.h", "src/tinytrain_model.c",
            "src/tinytrain_kernels.c", "src/tinytrain_params.c", "src/tinytrain_math.c")


def is_artifact_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``Artifact.export`` wrote (the one kind it replaces)."""
    try:
        meta = json.loads((path / "metadata.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and str(meta.get("format", "")).startswith(FORMAT)


def check_export_path(path: str | Path) -> Path:
    """Raise :class:`OutputError` unless ``export(path)`` can write there; call it before a long build."""
    if str(path) == "":
        raise OutputError("the output path is empty: name an artifact folder or a .tar file")
    if str(path).endswith(".tar"):
        return check_file(path)
    return check_folder(path, is_artifact_folder, "tvm-tinytrain artifact")


@dataclass
class Artifact:
    files: dict[str, str]  # relative path → text
    metadata: dict = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # relative path → bytes (the source model)

    @property
    def arena_bytes(self) -> int:
        return int(self.metadata["memory"]["arena_bytes"])

    def _contents(self) -> dict[str, bytes]:
        """Every file, ``metadata.json`` last, which lists the others' sizes (to tell a truncated copy)."""
        data = {name: text.encode() for name, text in sorted(self.files.items())}
        data.update(sorted(self.blobs.items()))
        meta = {**self.metadata, "files": {name: len(b) for name, b in data.items()}}
        if self.blobs:
            meta["binary"] = sorted(self.blobs)
        return {**data, "metadata.json": (json.dumps(meta, indent=2) + "\n").encode()}

    def export(self, path: str | Path) -> Path:
        """Write the artifact as a folder, or as a tar file when ``path`` ends with ``.tar``.

        Whole or not at all (``tvm_tinytrain.files``): an old file or artifact folder of that name is
        replaced only once the new one is complete; any other non-empty folder is refused."""
        if str(path).endswith(".tar"):
            with replacing_file(path) as tmp, tarfile.open(tmp, "w") as tar:
                for name, data in self._contents().items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            return Path(path)
        with replacing_folder(path, is_artifact_folder, "tvm-tinytrain artifact") as tmp:
            self.write_into(tmp)
        return Path(path)

    def write_into(self, folder: Path) -> None:
        """Write the files into ``folder`` as they are (no temporary): for a folder being built."""
        for name, data in self._contents().items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read back an exported artifact (folder or ``.tar``); a truncated or partial one: InputError."""
        if str(path) == "":
            raise InputError("the artifact path is empty: name an artifact folder or .tar")
        path = Path(path)
        try:
            files = _read(path)
        except (OSError, tarfile.TarError, EOFError, UnicodeDecodeError) as err:
            reason = " ".join(str(getattr(err, "strerror", None) or err).split()) or type(err).__name__
            raise InputError(f"cannot read artifact {path}: {reason}; export it again") from err
        if "metadata.json" not in files:
            raise InputError(f"{path} has no metadata.json: it is not a tvm-tinytrain artifact, or one cut "
                             f"short; export it again")
        try:
            metadata = json.loads(files.pop("metadata.json"))
        except ValueError as err:
            raise InputError(f"{path}: metadata.json is not valid JSON ({err}); export the artifact again")
        if not isinstance(metadata, dict) or not str(metadata.get("format", "")).startswith(FORMAT):
            raise InputError(f"{path}: metadata.json is not a tvm-tinytrain artifact's")
        sizes = metadata.pop("files", None) or dict.fromkeys(REQUIRED)
        binary = set(metadata.pop("binary", None) or ())
        missing = sorted(set(sizes) - set(files))
        if missing:
            raise InputError(f"artifact {path} is incomplete: {', '.join(missing)} missing; export it again")
        for name, size in sizes.items():
            if size is not None and len(files[name]) != size:
                raise InputError(f"artifact {path} is truncated: {name} has {len(files[name])} "
                                 f"bytes, metadata.json says {size}; export it again")
        try:
            text = {name: data.decode() for name, data in files.items() if name not in binary}
        except UnicodeDecodeError as err:
            raise InputError(f"cannot read artifact {path}: a file is not text ({err}); export it again") \
                from None
        return cls(text, metadata, {name: files[name] for name in binary if name in files})


def _read(path: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file in an artifact folder or ``.tar``."""
    files: dict[str, bytes] = {}
    if path.is_file() and path.suffix == ".tar":
        with tarfile.open(path, "r:") as tar:  # export writes plain tar
            for member in tar.getmembers():
                if member.isfile():
                    files[_safe_name(path, member.name)] = tar.extractfile(member).read()
    elif path.is_dir():
        for f in path.rglob("*"):
            if f.is_file():
                files[f.relative_to(path).as_posix()] = f.read_bytes()
    else:
        raise InputError(f"{path} is not an artifact: export one with "
                         f"build(..., target='c').export(path)")
    return files


def _safe_name(path: Path, name: str) -> str:
    """A member name that stays inside the folder it will be written to."""
    parts = PurePosixPath(name).parts
    if not parts or parts[0] == "/" or ".." in parts:
        raise InputError(f"{path} holds {name!r}, a path outside the artifact: it is not a tvm-tinytrain "
                         f"artifact")
    return PurePosixPath(*parts).as_posix()
