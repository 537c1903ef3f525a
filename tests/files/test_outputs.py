"""What lies where a command writes (d2lora_min/files/io.py: check_paths, output_lock): before any work, nothing but
real folders and regular files (a symbolic link is refused, never written through, the same way for every output of
every command), and one writer at a time in an output folder."""

import json
import os
import shutil
import stat

import pytest

import d2lora_min.train.tune as tune_mod
from d2lora_min.files.io import LOCK_FILE, Refused, check_paths, output_lock
from d2lora_min.train.cli import UsageError
from d2lora_min.train.compare import main as compare_main


def refused(main, argv, capsys):
    """main(argv)'s stderr, which must be a usage error (exit status 2) before any training."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and "s training" not in captured.out and "base:" not in captured.out, captured
    assert ": error: " in captured.err.strip().splitlines()[-1] and "Traceback" not in captured.err  # one line
    return captured.err


# --- check_paths ----------------------------------------------------------------------------------------------------


def make_device(path):
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except (PermissionError, AttributeError, OSError):
        pytest.skip("cannot make a device node here")


CASES = [
    ("link_to_a_folder_on_the_way", "adapters/x is in the way of a run's output (a symbolic link"),
    ("link_to_a_file_at_the_file", "results.md is in the way of a run's output (a symbolic link"),
    ("dangling_link_at_the_file", "results.md is in the way of a run's output (a symbolic link"),
    ("fifo_at_the_file", "results.md is in the way of a run's output (a FIFO where a file belongs"),
    ("device_at_the_file", "results.md is in the way of a run's output (a device or socket where a file belongs"),
    ("folder_at_the_file", "results.md is in the way of a run's output (a folder where a file belongs"),
    ("file_on_the_way", "adapters/x is in the way of a run's output (a file where a folder belongs"),
    ("link_at_a_folder", "work is in the way of a run's output (a symbolic link"),
]


@pytest.mark.parametrize("kind, match", CASES, ids=[kind for kind, _ in CASES])
def test_anything_but_folders_and_regular_files_where_a_command_writes_is_refused(tmp_path, kind, match):
    out, user = tmp_path / "out", tmp_path / "user"
    (out / "adapters").mkdir(parents=True)
    user.mkdir()
    (user / "mine.md").write_text("the user's own\n")
    {
        "link_to_a_folder_on_the_way": lambda: (out / "adapters" / "x").symlink_to(user),
        "link_to_a_file_at_the_file": lambda: (out / "results.md").symlink_to(user / "mine.md"),
        "dangling_link_at_the_file": lambda: (out / "results.md").symlink_to(user / "nothing"),
        "fifo_at_the_file": lambda: os.mkfifo(out / "results.md"),
        "device_at_the_file": lambda: make_device(out / "results.md"),
        "folder_at_the_file": lambda: (out / "results.md").mkdir(),
        "file_on_the_way": lambda: (out / "adapters" / "x").write_text(""),
        "link_at_a_folder": lambda: (out / "work").symlink_to(user),
    }[kind]()
    with pytest.raises(Refused, match=match.replace("(", r"\(")) as refusal:
        check_paths(
            out, files=[out / "results.md", out / "adapters" / "x" / "adapter.safetensors"], folders=[out / "work"]
        )
    assert (
        issubclass(UsageError, Refused) and type(refusal.value) is Refused
    )  # at a command line: a usage error (exit 2)
    assert (user / "mine.md").read_text() == "the user's own\n" and sorted(p.name for p in user.iterdir()) == [
        "mine.md"
    ]


def test_the_output_folder_itself_may_be_a_link_and_missing_paths_are_fine(tmp_path):
    (tmp_path / "real").mkdir()
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "real")  # the folder the user named: followed
    (out / "runs").mkdir()
    (out / "runs" / "a.json").write_text("{}")
    check_paths(
        out,
        files=[out / "runs" / "a.json", out / "adapters" / "x" / "adapter.safetensors"],
        folders=[out / "work" / "y"],
    )


# --- every output of compare, tune, pretrain and tour, the same way -----------------------------------------------


def test_a_link_in_the_way_of_any_output_of_compare_is_refused_before_any_work(tmp_path, tiny, capsys):
    out, user = tmp_path / "out", tmp_path / "user"
    argv = tiny.argv("--methods", "lora", out=out)
    assert compare_main(argv) == 0
    capsys.readouterr()
    (run,) = (out / "runs").glob("*.json")
    adapter_folder = out / json.loads(run.read_text())["adapter"]
    work = out / "work" / adapter_folder.name  # a killed run's checkpoint folder (gone once the run finished)
    work.mkdir()
    outputs = {"run JSON": run, "adapter folder": adapter_folder, "adapter file": adapter_folder / "adapter.safetensors",
               "work folder": work, "runs folder": out / "runs", "results.md": out / "results.md",
               "results.json": out / "results.json", "plot": out / "loss_curves.png", "lock file": out / LOCK_FILE}  # fmt: skip
    for what, path in outputs.items():
        user.mkdir()
        (user / "adapter.safetensors").write_bytes(b"15 bytes, mine.")
        moved = tmp_path / "moved"
        if path.exists():
            path.rename(moved)
        path.symlink_to(user / "adapter.safetensors" if what in ("run JSON", "adapter file", "results.md", "results.json", "plot",
                                                                 "lock file") else user)  # fmt: skip
        err = refused(compare_main, argv, capsys)
        assert f"{path} is in the way of a run's output (a symbolic link" in err, (what, err)
        assert sorted(p.name for p in user.iterdir()) == ["adapter.safetensors"], what
        assert (user / "adapter.safetensors").read_bytes() == b"15 bytes, mine.", what
        path.unlink()
        if moved.exists():
            moved.rename(path)
        for p in user.iterdir():
            p.unlink()
        user.rmdir()
    assert compare_main(argv) == 0  # everything back in place: the finished run is reused
    assert "1 of 1 runs reused" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["symlink_to_folder", "fifo_result", "dev_zero_result", "file_for_a_folder"])
def test_a_special_file_in_the_way_of_a_runs_output_is_refused_before_any_work(tmp_path, tiny, capsys, kind):
    out = tmp_path / "out"
    argv = tiny.argv("--methods", "lora", out=out)
    assert compare_main(argv) == 0
    (result_file,) = (out / "runs").glob("*.json")
    adapter = out / json.loads(result_file.read_text())["adapter"] / "adapter.safetensors"
    if kind == "symlink_to_folder":
        adapter.unlink()
        (tmp_path / "elsewhere").mkdir()
        adapter.symlink_to(tmp_path / "elsewhere")
    elif kind == "fifo_result":
        result_file.unlink()
        os.mkfifo(result_file)
    elif kind == "dev_zero_result":
        result_file.unlink()
        result_file.symlink_to("/dev/zero")
    else:  # a file where the adapter's folder belongs
        shutil.rmtree(adapter.parent)
        adapter.parent.write_text("")
    capsys.readouterr()
    err = refused(compare_main, argv, capsys)
    assert "is in the way of a run's output" in err


def test_a_link_in_the_way_of_a_tune_output_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "tune"
    out.mkdir()
    (tmp_path / "mine.png").write_bytes(b"png")
    (out / "tune_lr.png").symlink_to(tmp_path / "mine.png")
    err = refused(tune_mod.main, ["--methods", "lora", "--seeds", "100", "--grid", "0.01", "--out", str(out)], capsys)
    assert "tune_lr.png is in the way of a run's output (a symbolic link" in err
    assert (tmp_path / "mine.png").read_bytes() == b"png"


def test_pretrain_and_tour_refuse_a_link_in_the_way_and_pretrain_a_busy_folder(tmp_path, monkeypatch, capsys):
    import d2lora_min.train.pretrain as pretrain_mod
    import d2lora_min.tour as tour_mod

    monkeypatch.setattr(pretrain_mod, "build_corpus", lambda *a, **k: pytest.fail("started work"))
    monkeypatch.setattr(tour_mod, "draw", lambda *a, **k: pytest.fail("started work"))
    out = tmp_path / "base"
    out.mkdir()
    (tmp_path / "mine.json").write_text("{}")
    (out / "base.json").symlink_to(tmp_path / "mine.json")
    err = refused(pretrain_mod.main, ["--out", str(out), "--train.steps=1"], capsys)
    assert "base.json is in the way of a run's output (a symbolic link" in err
    (out / "base.json").unlink()
    with output_lock(out):
        assert f"{out} is in use" in refused(pretrain_mod.main, ["--out", str(out), "--train.steps=1"], capsys)
    (out / "tour_turn.png").symlink_to(tmp_path / "mine.json")
    err = refused(tour_mod.main, ["--out", str(out)], capsys)
    assert "tour_turn.png is in the way of a run's output (a symbolic link" in err
    assert (tmp_path / "mine.json").read_text() == "{}"


# --- one writer at a time -------------------------------------------------------------------------------------------


def test_a_second_compare_into_a_busy_output_folder_is_refused(tmp_path, tiny, capsys):
    out = tmp_path / "out"
    argv = tiny.argv("--methods", "lora", out=out)
    out.mkdir()
    with output_lock(out):  # as another compare holds it while it runs
        err = refused(compare_main, argv, capsys)
        assert f"{out} is in use: another command is writing into it" in err
        assert not (out / "runs").exists()
        err = refused(
            tune_mod.main, ["--methods", "lora", "--seeds", "100", "--grid", "0.01", "--out", str(out)], capsys
        )
        assert f"{out} is in use" in err
    assert compare_main(argv) == 0  # free again
    with output_lock(out):  # and the compare released it when it ended
        pass
