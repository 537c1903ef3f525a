"""make bench (bench.py)'s command line: what it measures and where it writes are checked before anything is measured
or written; --publish --name NAME also writes docs/results/NAME/."""

import pytest

from d2lora_min.train import bench
from d2lora_min.train.bench import main as bench_main


@pytest.mark.parametrize("only, match", [
    ("zzz", "--only 'zzz' matches nothing to measure"),
    ("", "--only is empty"),
])  # fmt: skip
def test_an_only_that_selects_nothing_is_a_usage_error_that_writes_nothing(tmp_path, monkeypatch, capsys, only, match):
    # a bench of nothing would replace the last report with an empty one
    monkeypatch.chdir(tmp_path)  # bench writes runs/<--name>/
    out = tmp_path / "runs" / "bench"
    out.mkdir(parents=True)
    (out / "bench.md").write_text("the last report\n")
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--only", only, "--quick"])
    assert exit_.value.code == 2 and match in capsys.readouterr().err
    assert (
        sorted(p.name for p in out.iterdir()) == ["bench.md"] and (out / "bench.md").read_text() == "the last report\n"
    )
    with pytest.raises(SystemExit):
        bench_main(["--only", only, "--quick", "--name", "new"])
    assert not (tmp_path / "runs" / "new").exists()


def test_bench_refuses_an_unwritable_output_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a folder")  # where runs/bench/ would go
    assert bench_main(["--quick"]) == 1
    err = capsys.readouterr().err
    assert "not writable" in err and "Traceback" not in err


def test_bench_publish_writes_its_report_under_docs_results(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "PUBLISHED", tmp_path / "published")
    assert bench.main(["--only", "sweep", "--quick", "--publish", "--name", "run_a"]) == 0
    for folder in (tmp_path / "runs" / "run_a", tmp_path / "published" / "run_a"):
        assert "fixed batch of 8 sequences" in (folder / "bench.md").read_text() and (folder / "bench.json").is_file()
    with pytest.raises(SystemExit):
        bench.main(["--only", "sweep", "--quick", "--publish", "--name", "../elsewhere"])
