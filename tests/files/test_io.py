"""Atomic writes and bounded reads (d2lora_min/files/io.py): an atomic write leaves the old file or the new one (the
new bytes on disk before they take the name) and nothing of its own when it fails; read_json reads a regular file of
bounded size and nothing else; and a kill at any write of a comparison leaves a state that resumes to the same result."""

import errno
import json
import os
import stat

import pytest
from safetensors.torch import load_file

from d2lora_min.files import io as io_mod
from d2lora_min.files.adapter_file import ADAPTER_FILE
from d2lora_min.files.checkpoints import read_checkpoint_state
from d2lora_min.files.io import atomic_path, read_json, write_json, write_text
from d2lora_min.train.compare import main as compare_main


def test_the_new_bytes_are_flushed_to_disk_before_they_take_the_files_name(tmp_path, monkeypatch):
    # a crash after the rename but before the data reached the disk would leave an empty or partial file under the
    # final name: fsync of the temporary file must come first
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.fspath(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "result.json"
    write_json(target, {"a": 1})
    renames = [e for e in events if e[0] == "replace" and e[2] == str(target)]
    assert len(renames) == 1, events
    renamed = renames[0][1]  # the temporary file's inode, which becomes the target
    synced_before = [e for e in events[: events.index(renames[0])] if e == ("fsync", renamed)]
    assert synced_before, f"the temporary file was not fsynced before the rename: {events}"
    assert read_json(target) == {"a": 1}


def full_disk_open(real_open):
    """open() whose files opened for writing fail on the first write, as on a full disk."""

    def opener(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:

            def write(_data):
                raise OSError(errno.ENOSPC, "No space left on device")

            f.write = write
        return f

    return opener


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "results.md"
    target.write_text("old\n")
    monkeypatch.setattr(io_mod, "open", full_disk_open(open), raising=False)
    with pytest.raises(OSError) as e:
        write_text(target, "new\n")
    assert e.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]  # no .results.md.*.tmp left behind
    assert target.read_text() == "old\n"


def test_an_error_inside_atomic_path_leaves_no_temporary_file(tmp_path):
    # what any writer does with the temporary path (safetensors, a plot, a checkpoint) is covered the same way
    with pytest.raises(OSError):
        with atomic_path(tmp_path / "adapter.safetensors") as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_read_json_refuses_a_fifo_by_name_without_waiting_for_a_writer(tmp_path):
    # opening a FIFO for reading blocks until a writer comes: without O_NONBLOCK this test hangs, and the suite's
    # hang guard (pytest-timeout, pyproject.toml) turns that into a failure
    path = tmp_path / "tuned.json"
    os.mkfifo(path)
    with pytest.raises(ValueError, match=r"tuned.json is a FIFO, not a JSON file"):
        read_json(path)


@pytest.mark.skipif(not os.path.exists(os.devnull) or not stat.S_ISCHR(os.stat(os.devnull).st_mode),
                    reason="no character device at os.devnull")  # fmt: skip
@pytest.mark.parametrize("through_a_link", [False, True], ids=["device", "link to a device"])
def test_read_json_refuses_a_character_device_by_name(tmp_path, through_a_link):
    # /dev/null reads as empty, /dev/zero never ends: either must be refused for what it is, not parsed
    path = os.devnull
    if through_a_link:
        path = tmp_path / "base.json"
        path.symlink_to(os.devnull)
    with pytest.raises(ValueError, match="is a device or socket, not a JSON file"):
        read_json(path)


def test_read_json_refuses_a_folder_by_name(tmp_path):
    with pytest.raises(ValueError, match="is a folder, not a JSON file"):
        read_json(tmp_path)


def test_read_json_takes_limit_bytes_and_refuses_one_more(tmp_path):
    # digits only: valid JSON at any length, so a reader that stopped at the limit would parse a truncated number
    limit = 64
    at_limit, over = tmp_path / "at.json", tmp_path / "over.json"
    at_limit.write_text("7" * limit)
    over.write_text("7" * (limit + 1))
    assert read_json(at_limit, limit=limit) == int("7" * limit)
    with pytest.raises(ValueError, match=f"holds more than {limit} bytes"):
        read_json(over, limit=limit)


# --- kills at every write: the old complete state or the new one, never a mix ------------------------------------


class Killed(BaseException):
    """Stands for a kill: raised at a write, before the file takes its name."""


def consistent(out):
    """Every finished file parses, and every finished run points at an adapter that exists and loads."""
    for p in out.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            if p.suffix == ".json":
                json.loads(p.read_text())
            elif p.suffix == ".safetensors":
                load_file(p)
            elif p.suffix == ".pt":
                read_checkpoint_state(p)
    for run in (out / "runs").glob("*.json") if (out / "runs").exists() else []:
        result = json.loads(run.read_text())
        load_file(out / result["adapter"] / ADAPTER_FILE)


def test_a_kill_at_any_write_leaves_a_consistent_state_that_resumes_to_the_same_result(tmp_path, tiny, monkeypatch):
    # (tiny: small retention probes; this test is about the order of the writes, and it runs 2 x (writes + 1) compares)
    argv = lambda out: tiny.argv("--methods", "d2lora", out=out, epochs=2, checkpoints=2)  # noqa: E731
    real_replace = os.replace
    compare_main(argv(tmp_path / "clean"))
    clean = json.loads(next((tmp_path / "clean" / "runs").glob("*.json")).read_text())
    calls = {"n": 0, "kill_at": None}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == calls["kill_at"]:
            raise Killed
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    calls["kill_at"] = -1
    compare_main(argv(tmp_path / "count"))
    n_writes = calls["n"]
    assert n_writes >= 5  # checkpoints, adapter, run JSON, results.md, results.json, plot
    for k in range(1, n_writes + 1):
        out = tmp_path / f"kill{k}"
        calls.update(n=0, kill_at=k)
        with pytest.raises(Killed):
            compare_main(argv(out))
        consistent(out)
        calls.update(n=0, kill_at=None)
        compare_main(argv(out))  # the rerun resumes or recomputes what is missing
        consistent(out)
        resumed = json.loads(next((out / "runs").glob("*.json")).read_text())
        assert resumed["losses"] == clean["losses"] and resumed["scores"] == clean["scores"], k
