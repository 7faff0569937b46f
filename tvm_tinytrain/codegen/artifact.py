"""The compiled artifact: C sources, header and ``metadata.json``, kept in memory until exported.

It is what Model Library Format was to microTVM: a folder (or a ``.tar``) that a
template project (``tvm_tinytrain.micro``) or a user's own build takes as it is::

    include/tinytrain_model.h    the C API
    src/tinytrain_model.c        executor: arena, kernel calls in plan order
    src/tinytrain_kernels.c      TVM's kernels, plain C
    src/tinytrain_params.c       frozen parameters and initial values, const (flash)
    src/tinytrain_math.c         expf / logf, identical on every target
    src/tinytrain_internal.h
    metadata.json                shapes, dtypes, plan, scheme, versions
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError


@dataclass
class Artifact:
    files: dict[str, str]  # relative path → text
    metadata: dict = field(default_factory=dict)

    @property
    def arena_bytes(self) -> int:
        return int(self.metadata["memory"]["arena_bytes"])

    def export(self, path: str | Path) -> Path:
        """Write the artifact as a folder, or as a tar file when ``path`` ends with ``.tar``."""
        path = Path(path)
        contents = {**self.files, "metadata.json": json.dumps(self.metadata, indent=2) + "\n"}
        if path.suffix == ".tar":
            path.parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(path, "w") as tar:
                for name, text in sorted(contents.items()):
                    data = text.encode()
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            return path
        for name, text in contents.items():
            target = path / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        """Read back an exported artifact (folder or ``.tar``)."""
        path = Path(path)
        files: dict[str, str] = {}
        if path.is_file() and path.suffix == ".tar":
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        files[member.name] = tar.extractfile(member).read().decode()
        elif path.is_dir():
            for f in path.rglob("*"):
                if f.is_file():
                    files[f.relative_to(path).as_posix()] = f.read_text()
        else:
            raise InputError(f"{path} is not an artifact: export one with "
                             f"build(..., target='c').export(path)")
        if "metadata.json" not in files:
            raise InputError(f"{path} has no metadata.json: it is not a tvm-tinytrain artifact")
        metadata = json.loads(files.pop("metadata.json"))
        return cls(files, metadata)
