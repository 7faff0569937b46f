"""Files written whole or not at all, and nothing deleted that tinytrain did not make.

Artifacts (folder or ``.tar``), memory plots and projects: a failed write (full disk, read-only
or missing folder, a path under a regular file) is one ``tinytrain: error:`` line, exit 2, with
the old file left byte for byte and no temporary left; ``create-project`` refuses the current
folder, its parents, home and any non-empty folder that is not a project it made, and an existing
folder unless ``--force``.
Full disk and read-only folders are simulated by making the write raise (tests run as root,
where chmod does not stop writes).
"""

from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path

import pytest

from tvm_tinytrain import micro
from tvm_tinytrain.cli import main
from tvm_tinytrain.codegen.artifact import REQUIRED, Artifact
from tvm_tinytrain.errors import InputError, OutputError
from tvm_tinytrain.files import _protected
from tvm_tinytrain.memory import Buffer, plan_memory

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def run_main(capsys, *argv) -> tuple[int, str]:
    """``main(argv)``: (exit status, stderr), checking an error is one ``tinytrain: error:`` line."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if code == 2:
        assert out == "" and err.count("\n") == 1 and err.startswith("tinytrain: error: "), err
    return code, err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``folder``, hidden ones included."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def fake_artifact(tag: str = "new") -> Artifact:
    """An artifact with the files of a real one (not compilable C: enough to write and copy)."""
    return Artifact({name: f"/* {tag} {name} */\n" for name in REQUIRED},
                    {"format": "tvm-tinytrain artifact 1", "tag": tag})


def full_disk_after(monkeypatch, cls, method: str, calls: int = 1) -> None:
    """``cls.method`` writes ``calls`` times, then fails as a full disk does (after writing part)."""
    real = getattr(cls, method)
    count = [0]

    def write(self, *args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise ENOSPC
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, write)


# ---- artifacts -----------------------------------------------------------------------------
def test_tar_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.tar"
    path.write_bytes(b"a good old artifact")
    full_disk_after(monkeypatch, tarfile.TarFile, "addfile", calls=2)
    with pytest.raises(OutputError, match=f"cannot write {path}: No space left on device"):
        fake_artifact().export(path)
    assert path.read_bytes() == b"a good old artifact"
    assert os.listdir(tmp_path) == ["model.tar"]


def test_folder_on_a_full_disk_keeps_the_old_artifact(tmp_path, monkeypatch):
    path = fake_artifact("old").export(tmp_path / "model")
    before = snapshot(path)
    full_disk_after(monkeypatch, Path, "write_bytes", calls=3)
    with pytest.raises(OutputError, match="cannot write .*model: No space left on device"):
        fake_artifact("new").export(path)
    assert snapshot(path) == before
    assert os.listdir(tmp_path) == ["model"]


def test_an_old_artifact_folder_is_replaced_whole(tmp_path):
    path = fake_artifact("old").export(tmp_path / "model")
    (path / "src" / "stale.c").write_text("from the old export")
    fake_artifact("new").export(path)
    loaded = Artifact.load(path)
    assert loaded.metadata["tag"] == "new" and "src/stale.c" not in loaded.files
    assert os.listdir(tmp_path) == ["model"]


def test_a_folder_that_is_no_artifact_is_refused(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="not a tvm-tinytrain artifact"):
        fake_artifact().export(folder)
    assert snapshot(folder) == {"notes.txt": b"keep me"}
    fake_artifact().export(tmp_path / "empty")  # an empty folder is fine
    (tmp_path / "empty2").mkdir()
    assert Artifact.load(fake_artifact().export(tmp_path / "empty2")).metadata["tag"] == "new"


def test_compile_on_a_full_disk_is_one_line_and_keeps_the_old_tar(small_onnx, tmp_path, capsys,
                                                                  monkeypatch):
    path = tmp_path / "out" / "model.tar"
    path.parent.mkdir()
    path.write_bytes(b"a good old artifact")
    full_disk_after(monkeypatch, tarfile.TarFile, "addfile", calls=3)
    code, err = run_main(capsys, "compile", small_onnx, "--scheme", "last-layer", "-o", path)
    assert code == 2 and f"cannot write {path}: No space left on device" in err
    assert path.read_bytes() == b"a good old artifact"
    assert os.listdir(path.parent) == ["model.tar"]


@pytest.mark.parametrize("output, words", [
    ("", ["empty"]),
    ("missing/model.tar", ["missing does not exist"]),
    ("missing/model", ["missing does not exist"]),
    ("afile/model.tar", ["afile is not a folder"]),
    ("afile/model", ["afile is not a folder"]),
    ("afile", ["afile", "not a folder"]),
    ("mine", ["mine", "not a tvm-tinytrain artifact"]),
    (".", ["current folder"]),
])
def test_compile_output_that_cannot_be_written(small_onnx, tmp_path, capsys, monkeypatch, output, words):
    """Refused before the build, one line; nothing in the folder changes."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    code, err = run_main(capsys, "compile", small_onnx, "-o", output)
    assert code == 2 and all(w in err for w in words), err
    assert snapshot(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == ["afile", "mine", "small_cnn.onnx"]


def test_read_only_folder(tmp_path, monkeypatch):
    """A read-only folder: the temporary cannot be made (EROFS, as root cannot be stopped by chmod)."""
    path = tmp_path / "model.tar"
    path.write_bytes(b"old")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(tarfile, "open", read_only)
    with pytest.raises(OutputError, match="cannot write .*model.tar: Read-only file system"):
        fake_artifact().export(path)
    monkeypatch.setattr("tvm_tinytrain.files.os.mkdir", read_only)
    with pytest.raises(OutputError, match="cannot write .*model: Read-only file system"):
        fake_artifact().export(tmp_path / "model")
    assert os.listdir(tmp_path) == ["model.tar"] and path.read_bytes() == b"old"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a chmod 0o500 folder")
def test_chmod_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="Permission denied"):
            fake_artifact().export(folder / "model.tar")
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o700)


# ---- reading artifacts back ----------------------------------------------------------------
def test_truncated_or_partial_artifacts_are_one_line_errors(tmp_path, capsys):
    tar = fake_artifact().export(tmp_path / "model.tar")
    data = tar.read_bytes()
    cases = {}
    for name, size in (("half.tar", len(data) // 2), ("cut.tar", 1536), ("stub.tar", 100)):
        (tmp_path / name).write_bytes(data[:size])
        cases[name] = ["export it again"]
    (tmp_path / "empty.tar").write_bytes(b"")
    cases["empty.tar"] = ["empty.tar"]
    folder = fake_artifact().export(tmp_path / "folder")
    (folder / "src" / "tinytrain_params.c").unlink()
    cases["folder"] = ["incomplete", "src/tinytrain_params.c missing"]
    short = fake_artifact().export(tmp_path / "short")
    (short / "src" / "tinytrain_model.c").write_text("/* cut")
    cases["short"] = ["truncated", "src/tinytrain_model.c"]
    bad_meta = fake_artifact().export(tmp_path / "badmeta")
    (bad_meta / "metadata.json").write_text('{"format": "tvm-tin')
    cases["badmeta"] = ["metadata.json is not valid JSON"]
    with tarfile.open(tmp_path / "evil.tar", "w") as evil:
        evil.add(tar, arcname="../escape.tar")
    cases["evil.tar"] = ["../escape.tar", "outside"]
    cases[""] = ["empty"]
    for name, words in cases.items():
        with pytest.raises(InputError) as excinfo:
            Artifact.load(tmp_path / name if name else "")
        assert "\n" not in str(excinfo.value) and all(w in str(excinfo.value) for w in words), \
            (name, str(excinfo.value))
        code, err = run_main(capsys, "micro", "create-project", tmp_path / f"proj-{name}",
                             tmp_path / name if name else "", "host")
        assert code == 2 and all(w in err for w in words), (name, err)
        assert not (tmp_path / f"proj-{name}").exists()
    assert not (tmp_path.parent / "escape.tar").exists()


def test_an_artifact_exported_before_the_file_list_still_loads(tmp_path):
    """Without metadata.json's "files", the files every artifact has are required."""
    folder = fake_artifact().export(tmp_path / "model")
    meta = json.loads((folder / "metadata.json").read_text())
    del meta["files"]
    (folder / "metadata.json").write_text(json.dumps(meta))
    assert Artifact.load(folder).files == fake_artifact().files
    (folder / "src" / "tinytrain_math.c").unlink()
    with pytest.raises(InputError, match="src/tinytrain_math.c missing"):
        Artifact.load(folder)


# ---- memory plots --------------------------------------------------------------------------
def small_plan():
    return plan_memory([Buffer("a", 64, 0, 1, "activation"), Buffer("b", 32, 1, 2, "gradient")])


def test_plot_on_a_full_disk_keeps_the_old_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    path = tmp_path / "mem.png"
    path.write_bytes(b"an old plot")
    real = Figure.savefig

    def half_then_full(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise ENOSPC

    monkeypatch.setattr(Figure, "savefig", half_then_full)
    with pytest.raises(OutputError, match="cannot write .*mem.png: No space left on device"):
        small_plan().plot_png(path)
    assert path.read_bytes() == b"an old plot" and os.listdir(tmp_path) == ["mem.png"]
    monkeypatch.setattr(Figure, "savefig", real)
    small_plan().plot_png(path)
    assert path.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == ["mem.png"]


@pytest.mark.parametrize("plot, words", [
    ("", ["empty"]),
    ("missing/mem.png", ["missing does not exist"]),
    ("afile/mem.png", ["afile is not a folder"]),
    (".", ["is a folder"]),
])
def test_memory_plot_that_cannot_be_written(small_onnx, tmp_path, capsys, monkeypatch, plot, words):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("a regular file")
    code, err = run_main(capsys, "memory", small_onnx, "--no-tvm", "--plot", plot)
    assert code == 2 and all(w in err for w in words), err
    assert sorted(os.listdir(tmp_path)) == ["afile", "small_cnn.onnx"]


# ---- projects ------------------------------------------------------------------------------
def test_create_project_dot_keeps_everything(tmp_path, capsys, monkeypatch):
    """The finding: ``create-project ART -o .`` deleted the current folder's files, then failed
    (now ``micro create-project . ART host --force``)."""
    tar = fake_artifact().export(tmp_path / "model.tar")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "sentinel.txt").write_text("still here")
    monkeypatch.chdir(work / "sub")
    monkeypatch.setenv("HOME", str(work))
    before = snapshot(tmp_path)
    for output in (".", "", "..", "../..", os.getcwd(), str(work), "~"):
        code, err = run_main(capsys, "micro", "create-project", os.path.expanduser(output), tar, "host",
                             "--force")
        assert code == 2, (output, err)
        assert ("empty" if output == "" else "current folder") in err, (output, err)
    assert snapshot(tmp_path) == before
    assert all(_protected(Path(p)) for p in ("/", ".", "..", str(work), str(tmp_path)))
    assert not _protected(work / "sub" / "proj")


def test_create_project_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    tar = fake_artifact().export(tmp_path / "model.tar")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    for force in ((), ("--force",)):
        code, err = run_main(capsys, "micro", "create-project", mine, tar, "host", *force)
        assert code == 2 and "is not a tinytrain project" in err
    assert snapshot(mine) == {"thesis.tex": b"keep me"}
    (tmp_path / "afile").write_text("a file")
    for output, words in ((tmp_path / "afile", "not a folder"),
                          (tmp_path / "missing" / "p", "does not exist"),
                          (tmp_path / "afile" / "p", "afile is not a folder"),
                          (micro.TEMPLATES / "host", "not a tinytrain project"),
                          (micro.TEMPLATES / "host" / "p", "inside template")):
        code, err = run_main(capsys, "micro", "create-project", output, tar, "host", "--force")
        assert code == 2 and words in err, (output, err)
    assert not (micro.TEMPLATES / "host" / "p").exists()


def test_create_project_replaces_its_own_project_whole(tmp_path, capsys):
    tar = fake_artifact().export(tmp_path / "model.tar")
    proj = tmp_path / "proj"
    proj.mkdir()  # an empty folder is taken with --force, and only with it
    code, err = run_main(capsys, "micro", "create-project", proj, tar, "host")
    assert code == 2 and "already exists" in err and "--force" in err and os.listdir(proj) == []
    assert run_main(capsys, "micro", "create-project", proj, tar, "host", "--force")[0] == 0
    assert micro.is_project(proj) and (proj / "model" / "include" / "tinytrain_model.h").is_file()
    (proj / "build").mkdir()
    (proj / "build" / "old.o").write_text("a build of the old project")
    before = snapshot(proj)
    code, err = run_main(capsys, "micro", "create-project", proj, tar, "qemu_cortex_m7")
    assert code == 2 and "already exists" in err and snapshot(proj) == before
    with pytest.raises(OutputError, match="already exists"):
        micro.create_project(fake_artifact("v2"), "qemu_cortex_m7", proj)
    project = micro.create_project(fake_artifact("v2"), "qemu_cortex_m7", proj, force=True)
    assert project.path == proj and not (proj / "build").exists()
    assert json.loads((proj / "model" / "metadata.json").read_text())["tag"] == "v2"
    assert (proj / "link.ld.in").is_file() and micro.is_project(proj)
    assert sorted(os.listdir(tmp_path)) == ["model.tar", "proj"]


def test_create_project_on_a_full_disk_keeps_the_old_project(tmp_path, monkeypatch):
    proj = micro.create_project(fake_artifact("old"), "host", tmp_path / "proj").path
    before = snapshot(proj)
    full_disk_after(monkeypatch, Path, "write_bytes", calls=2)
    with pytest.raises(OutputError, match="cannot write .*proj: No space left on device"):
        micro.create_project(fake_artifact("new"), "host", proj, force=True)
    assert snapshot(proj) == before and os.listdir(tmp_path) == ["proj"]


def test_create_project_whose_rename_fails_puts_the_old_one_back(tmp_path, monkeypatch):
    proj = micro.create_project(fake_artifact("old"), "host", tmp_path / "proj").path
    before = snapshot(proj)
    real = os.rename

    def rename(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return real(src, dst)

    monkeypatch.setattr("tvm_tinytrain.files.os.rename", rename)
    with pytest.raises(OutputError, match="cannot write .*proj: Invalid cross-device link"):
        micro.create_project(fake_artifact("new"), "host", proj, force=True)
    assert snapshot(proj) == before and os.listdir(tmp_path) == ["proj"]
