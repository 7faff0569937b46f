"""The hand-written C kernels on the host: compiled once, loaded before TVM needs them.

TVM's llvm build of a module whose kernels call the hand-written C (``codegen/runtime``,
``s8_kernels.use_hand_kernels``) leaves those calls as undefined symbols, resolved in the
process when the module is compiled (JIT) or a library ``export_library`` wrote is loaded. So:

1. The key is the SHA-256 of the compiler, its flags, and each runtime source's name and bytes.
2. ``<cache>/host-kernels/libtinytrain_kernels-<key>.so`` is built with the host C compiler unless
   it is there (written beside, then renamed: ``tvm_tinytrain.files``; two processes racing both
   build it, and either copy is right). ``<cache>``: ``$TINYTRAIN_CACHE``, else
   ``$XDG_CACHE_HOME/tvm-tinytrain``, else ``~/.cache/tvm-tinytrain`` (the search's cache).
3. It is loaded once per process with ``RTLD_GLOBAL``, so every TVM module after sees its symbols.

The host runs the same C as the device: the int8 forward of the host path equals the C artifact's.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import tvm
from tvm import tirx

from ..errors import TinyTrainError
from ..files import cache_dir, replacing_file
from .s8_kernels import HAND_KERNEL, RUNTIME_SOURCES, use_hand_kernels

# -O3: gcc vectorises the portable loops (a 16->96 1x1 conv: 5.1 -> 3.3 ns per MAC on x86-64; TVM's
# llvm build of the same TE kernel: 20 ns); integer arithmetic, so any flags give the same bits
FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off")
_loaded: dict[str, Path] = {}  # key → the library loaded in this process


def runtime_sources() -> dict[str, bytes]:
    """The hand kernels' C sources and headers, by file name (what the artifact ships in ``src/``)."""
    folder = resources.files(__package__).joinpath("runtime")
    return {name: folder.joinpath(name).read_bytes() for name in RUNTIME_SOURCES}


def host_compiler() -> str:
    """``$CC``, else ``cc``, else ``gcc``: a one-line TinyTrainError when none is there."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name.split()[0]):
            return name
    raise TinyTrainError("no C compiler found ($CC, cc, gcc): the host build of an int8 model runs "
                         "the hand-written kernels of tvm_tinytrain/codegen/runtime, compiled once; "
                         "install one (apt-get install gcc) or set CC")


def uses_hand_kernels(mod: tvm.IRModule) -> bool:
    return any(isinstance(f, tirx.PrimFunc) and f.attrs is not None and HAND_KERNEL in f.attrs
               for f in mod.functions.values())


def load_host_kernels() -> Path:
    """Build (once, cached on disk) and load (once per process) the hand kernels' host library."""
    sources = runtime_sources()
    compiler = host_compiler()
    h = hashlib.sha256("\0".join([compiler, *FLAGS]).encode())
    for name, data in sorted(sources.items()):
        h.update(b"\0" + name.encode() + b"\0" + data)
    key = h.hexdigest()[:20]
    if key in _loaded:
        return _loaded[key]
    folder = cache_dir() / "host-kernels"
    path = folder / f"libtinytrain_kernels-{key}.so"
    if not path.is_file():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TinyTrainError(f"cannot make {folder} for the host kernels ({err.strerror}); "
                                 "set TINYTRAIN_CACHE to a writable folder") from None
        _compile(compiler, sources, path)
    ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    _loaded[key] = path
    return path


def _compile(compiler: str, sources: dict[str, bytes], path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="tinytrain-kernels-") as tmp:
        for name, data in sources.items():
            (Path(tmp) / name).write_bytes(data)
        units = [str(Path(tmp) / n) for n in sorted(sources) if n.endswith(".c")]
        with replacing_file(path) as out:
            run = subprocess.run([*compiler.split(), *FLAGS, f"-I{tmp}", *units, "-o", str(out)],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                first = (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[0]
                raise TinyTrainError(f"{compiler} could not compile the host kernels ({first[:200]}); "
                                     "check the compiler or set CC to another one")


def with_hand_kernels(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with its int8 forward kernels calling the hand-written C (``s8_kernels.use_hand_kernels``),
    and that C loaded into this process when any does (a float model needs no C compiler)."""
    mod = use_hand_kernels(mod)
    if uses_hand_kernels(mod):
        load_host_kernels()
    return mod
