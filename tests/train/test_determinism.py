"""make determinism (scripts/determinism.py): two fresh runs of a seeded comparison, compared run by run and item by item."""

import json

import pytest

from scripts.determinism import compare_folders, main


def test_a_seeded_compare_repeats_to_the_last_bit_and_determinism_says_so(tmp_path, tiny):
    for name in ("first", "second"):
        assert tiny("--methods", "lora d2lora", "--reference=lora", out=tmp_path / name) == 0
    table, summary = compare_folders(tmp_path / "first", tmp_path / "second")
    assert summary.startswith("2 of 2 runs identical")
    run = next((tmp_path / "second" / "runs").glob("d2lora*.json"))
    result = json.loads(run.read_text())
    result["items"]["who"]["logp"][0][0] += 1e-3  # one choice's log-likelihood, a little off
    run.write_text(json.dumps(result))
    table, summary = compare_folders(tmp_path / "first", tmp_path / "second")
    assert summary.startswith("1 of 2 runs identical") and "| 0.001 |" in table


def test_determinism_refuses_one_folder_given_twice(tmp_path, capsys):
    # a folder compared with itself always agrees: "21 of 21 runs identical" would be no evidence
    (tmp_path / "out" / "runs").mkdir(parents=True)
    for second in (tmp_path / "out", tmp_path / "." / "out" / "runs" / ".."):
        with pytest.raises(SystemExit) as exit_:
            main(["--only", str(tmp_path / "out"), str(second)])
        assert exit_.value.code == 2 and "--only names one folder twice" in capsys.readouterr().err
