"""Tasks from JSONL files (`--tasks DIR`, d2lora_min/own/tasks.py): every malformed line is refused before any work
with file:line and the field, and the embedded tasks written out as files give the native path's numbers bit for bit."""

import json

import pytest

import d2lora_min.own.session as session_mod
import d2lora_min.train.compare as compare_mod
from d2lora_min.own import tasks as own_tasks
from d2lora_min.own.export import main as export_main
from d2lora_min.synthetic.tasks import TASKS
from d2lora_min.synthetic.world import World
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.tasks import build_splits

from .folders import tiny_tasks, write_tasks

GOOD_MC = {"split": "train", "prompt": "Q: Is it?\nA:", "choices": [" yes", " no"], "answer": 0}
GOOD_GEN = {"split": "test", "prompt": "Q: What?\nA:", "target": "the cup"}

LINES = [
    # (the bad line, what the error says after "file:2: ")
    ({**GOOD_MC, "answer": 2}, "answer 2 is out of range for 2 choices (0 to 1)"),
    ({**GOOD_MC, "answer": -1}, "answer -1 is out of range"),
    ({**GOOD_MC, "answer": True}, "answer must be an integer"),
    ({k: v for k, v in GOOD_MC.items() if k != "prompt"}, "missing field 'prompt'"),
    ({k: v for k, v in GOOD_MC.items() if k != "split"}, "missing field 'split'"),
    ({k: v for k, v in GOOD_MC.items() if k != "answer"}, "missing field 'answer'"),
    ({**GOOD_MC, "choices": " yes, no"}, "choices must be a list of strings, got str"),
    ({**GOOD_MC, "choices": [" yes"]}, "choices must hold 2 to 64 strings, got 1"),
    ({**GOOD_MC, "choices": [" yes", 3]}, "choices[1] must be a string, got int"),
    ({**GOOD_MC, "choices": [" yes", " yes"]}, "choices holds the same string twice"),
    ({**GOOD_MC, "split": "dev"}, "split must be train, validation or test, got 'dev'"),
    ({**GOOD_MC, "prompt": ""}, "prompt is empty"),
    ({**GOOD_MC, "prompt": 7}, "prompt must be a string, got int"),
    ({**GOOD_MC, "weight": 2}, "unknown field 'weight'"),
    ({**GOOD_MC, "cluster": 3}, "cluster must be a string"),
    ({"split": "train", "prompt": "x"}, "no choices/answer and no target"),
    (GOOD_GEN, "a generation line in a multiple-choice task (line 1)"),
    ({**GOOD_MC, "split": "test"}, "prompt is also a training prompt (line 1)"),
    ("[1, 2]", "a line must be a JSON object, got list"),
    ('{"split": "train", "prompt": "x", ', "not valid JSON"),
    ("{'split': 'train'}", "not valid JSON"),
    (b"\xff\xfe", "not UTF-8"),
]


def write(path, lines):
    as_bytes = [line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
                for line in lines]  # fmt: skip
    path.write_bytes(b"".join(line + b"\n" for line in as_bytes))


@pytest.fixture
def no_work(monkeypatch):
    """Any loading or training is an error: a bad line must be refused before it."""

    def forbidden(*a, **k):
        raise AssertionError("work started before the task files were checked")

    monkeypatch.setattr(compare_mod, "resolve_base", forbidden)
    monkeypatch.setattr(compare_mod, "run_one", forbidden)
    monkeypatch.setattr(session_mod, "prepare", forbidden)


def refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err and ": error: " in err.strip().splitlines()[-1], err
    return err.strip().splitlines()[-1]  # the one line that says what is wrong


@pytest.mark.parametrize("bad, message", LINES, ids=[m for _, m in LINES])
def test_a_malformed_line_is_refused_before_any_work_with_its_file_line_and_field(
    tmp_path, bad, message, no_work, capsys
):
    folder = tmp_path / "tasks"
    folder.mkdir()
    write(folder / "good.jsonl", [GOOD_MC, {**GOOD_MC, "split": "test", "prompt": "Q: Other?\nA:"}])
    write(folder / "bad.jsonl", [GOOD_MC, bad, {**GOOD_MC, "split": "test", "prompt": "Q: Is it not?\nA:"}])
    err = refused(["--tasks", str(folder), "--out", str(tmp_path / "out")], capsys)
    assert f"{folder / 'bad.jsonl'}:2: {message}" in err, err


@pytest.mark.parametrize("files, message", [
    ({"who.jsonl": None, "a.json": '{"scoring": "mean"}'}, "a.json: a settings file without its a.jsonl"),
    ({"who.jsonl": None, "who.json": '{"scoring": "best"}'}, "scoring must be sum or mean, got 'best'"),
    ({"who.jsonl": None, "who.json": '{"max_new_tokens": 5}'}, "at most scoring (a mc task)"),
    ({"who.jsonl": ""}, "who.jsonl: no items"),
    ({"who x.jsonl": None}, "a task's name may hold only letters"),
    ({"only_gen.jsonl": json.dumps(GOOD_GEN)}, "no multiple-choice task"),
])  # fmt: skip
def test_bad_task_folders_and_settings_files_are_refused(tmp_path, files, message, no_work, capsys):
    folder = tmp_path / "tasks"
    folder.mkdir()
    two = json.dumps(GOOD_MC) + "\n" + json.dumps({**GOOD_MC, "split": "test", "prompt": "b"})
    for name, text in files.items():
        (folder / name).write_text(two if text is None else text)
    assert message in refused(["--tasks", str(folder), "--out", str(tmp_path / "out")], capsys)


def test_a_task_without_the_items_a_run_needs_is_refused(tmp_path, no_work, capsys):
    folder = write_tasks(tmp_path / "tasks", {"who": [line for line in tiny_tasks()["who"] if line["split"] != "test"]})
    assert "who.jsonl: no test items" in refused(["--tasks", str(folder), "--out", str(tmp_path / "out")], capsys)


def test_an_embedded_task_name_is_never_taken_for_a_folder(tmp_path, monkeypatch, no_work, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "who").mkdir()  # a folder named like a task: --tasks=who still means the embedded task
    assert "a folder of <task>.jsonl" in refused(["--tasks=nope", "--out", str(tmp_path / "out")], capsys)
    with pytest.raises(AssertionError, match="work started"):  # it got past every check, to the base
        compare_main(["--tasks=who", "--methods", "lora", "--reference=lora", "--out", str(tmp_path / "out")])


def test_written_tasks_read_back_as_the_same_items_and_settings(tmp_path):
    tasks = {name: TASKS[name] for name in ("continuation", "facts", "span")}
    splits = build_splits(World(), tasks, n_train=6, n_test=5, n_validation=4, seed=0)
    read = own_tasks.read_folder(own_tasks.write_folder(tasks, splits, tmp_path))
    assert list(read) == ["continuation", "facts", "span"]
    for name, task in read.items():
        assert task.parts == splits[name] and (task.kind, task.normalise) == (TASKS[name].kind, TASKS[name].normalise)
    assert read["span"].max_new_tokens == TASKS["span"].max_new_tokens and read["facts"].parts.test[0].cluster


RUNS = ("--methods", "lora d2lora", "--reference=lora", "--lr_source=shared")
COUNTS = {"n_train": 8, "n_test": 8, "n_validation": 4}  # the native draw; the files hold these items
PROOF_TASKS = "continuation,facts,span,who"  # file-name order (what a folder runs in): scorers, clusters, generation


def test_embedded_tasks_as_jsonl_give_the_native_numbers_bit_for_bit(tmp_path, tiny):
    """Proof (a): the embedded tasks written out by `d2lora export tasks` and compared through --tasks DIR train the
    same losses, score every item the same and give the same differences, intervals and verdicts."""
    counts = [f"--{k}={v}" for k, v in COUNTS.items()]
    assert export_main(["tasks", "--out", str(tmp_path / "tasks"), f"--tasks={PROOF_TASKS}", *counts]) == 0
    assert tiny(*RUNS, out=tmp_path / "native", tasks=PROOF_TASKS, **COUNTS) == 0
    assert tiny(*RUNS, out=tmp_path / "files", tasks=str(tmp_path / "tasks"), n_train=None, n_test=None) == 0
    native, files = tiny.runs(tmp_path / "native"), tiny.runs(tmp_path / "files")
    assert native.keys() == files.keys() == {"lora", "d2lora"}
    for method in native:
        for field in ("losses", "items", "scores", "trainable_params"):
            assert native[method][field] == files[method][field], (method, field)
    rows = {out: {r["method"]: r for r in json.loads((tmp_path / out / "results.json").read_text())["rows"]}
            for out in ("native", "files")}  # fmt: skip
    for field in ("scores", "mean_mc", "vs_reference", "gen_vs_reference"):
        assert rows["native"]["d2lora"][field] == rows["files"]["d2lora"][field], field
    print(f"proof (a): {len(native)} methods x {len(native['lora']['items'])} tasks, every item equal bit for bit")
