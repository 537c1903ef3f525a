"""d2lora_min/train/bench.py's command line: what it measures is checked before anything is measured or written."""

import pytest

from d2lora_min.train.bench import main as bench_main


@pytest.mark.parametrize("only, match", [("zzz", "--only 'zzz' matches nothing to measure"), ("", "--only is empty")])
def test_an_only_that_selects_nothing_is_a_usage_error_that_writes_nothing(tmp_path, capsys, only, match):
    # a bench of nothing would replace the last report with an empty one
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.md").write_text("the last report\n")
    with pytest.raises(SystemExit) as exit_:
        bench_main(["--only", only, "--quick", "--out", str(out)])
    assert exit_.value.code == 2 and match in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["bench.md"] and (out / "bench.md").read_text() == "the last report\n"
    with pytest.raises(SystemExit):
        bench_main(["--only", only, "--quick", "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()
