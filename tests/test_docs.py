"""The code in the docs runs and says what it claims."""

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]


def porting_snippets():
    return re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "PORTING.md").read_text(), re.S)


def test_porting_snippet_checks_the_golden_file(monkeypatch, capsys):
    snippet = porting_snippets()[0]
    monkeypatch.chdir(ROOT)
    exec(compile(snippet, "PORTING.md", "exec"), {})
    assert "forward and merged weight match" in capsys.readouterr().out


def raw_tensors(path):
    """{name: numpy array} of a safetensors file, read from its bytes as PORTING.md describes (bfloat16 as uint16)."""
    import struct

    import numpy as np

    data = Path(path).read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    kinds = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}
    return {k: np.frombuffer(data[8 + n + v["data_offsets"][0] : 8 + n + v["data_offsets"][1]], kinds[v["dtype"]]).reshape(v["shape"])
            for k, v in header.items()}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_porting_checksum_is_the_one_adapter_files_carry(tmp_path, dtype):
    from safetensors import safe_open

    from d2lora_min.files.adapter_file import CHECKSUM_KEY, CONFIG_KEY
    from d2lora_min.nn import inject_adapters, save_adapters

    snippet = porting_snippets()[1]
    names = {}
    exec(compile(snippet, "PORTING.md", "exec"), names)
    base = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 4)).to(dtype)
    model = inject_adapters(base, "d2lora", r=2, alpha=4, targets=("0", "1"))
    path = save_adapters(model, tmp_path)
    with safe_open(path, framework="np") as f:
        metadata = f.metadata()
    assert json.loads(metadata[CONFIG_KEY])["format"] == 4
    assert names["adapter_sha256"](metadata[CONFIG_KEY], raw_tensors(path)) == metadata[CHECKSUM_KEY]
    config = json.loads(metadata[CONFIG_KEY])
    weights = {name: model.get_submodule(name).base.weight.detach() for name in ("0", "1")}
    raw = {
        name: (w.view(torch.int16).numpy().view("<u2") if dtype == torch.bfloat16 else w.numpy())
        for name, w in weights.items()
    }
    assert {name: names["base_sha256"](w) for name, w in raw.items()} == config["base_sha256"]


def test_porting_digests_match_the_reference_adapter_file():
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from d2lora_min.files.adapter_file import CHECKSUM_KEY, CONFIG_KEY
    from d2lora_min.nn import load_adapters

    names = {}
    exec(compile(porting_snippets()[1], "PORTING.md", "exec"), names)
    folder = ROOT / "tests" / "golden" / "adapter_file"
    with safe_open(str(folder / "adapter.safetensors"), framework="np") as f:
        metadata = f.metadata()
    digest = re.search(r"its checksum is\n\n    ([0-9a-f]{64})", (ROOT / "docs" / "PORTING.md").read_text()).group(1)
    assert (
        names["adapter_sha256"](metadata[CONFIG_KEY], load_file(folder / "adapter.safetensors"))
        == metadata[CHECKSUM_KEY]
        == digest
    )
    base = load_file(folder / "base.safetensors")
    config = json.loads(metadata[CONFIG_KEY])
    assert {name: names["base_sha256"](base[f"{name}.weight"]) for name in ("0", "1")} == config["base_sha256"]
    model = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 4))
    with torch.no_grad():
        for name in ("0", "1"):
            model.get_submodule(name).weight.copy_(torch.from_numpy(base[f"{name}.weight"]))
    load_adapters(model, folder)  # the base it belongs to takes it


def test_readme_gives_each_constructor_signature_as_the_code_has_it():
    import inspect

    from d2lora_min.nn import D2LoRALinear, DoRALinear, LoRALinear, inject_adapters

    text = (ROOT / "README.md").read_text()
    for fn in (LoRALinear, DoRALinear, D2LoRALinear, inject_adapters):
        shown = re.search(rf"#   ({fn.__name__}\(.*?\))", text).group(1)
        params = inspect.signature(fn).parameters.values()
        first = next(iter(params)).name == "self"
        actual = ", ".join(str(p) for p in list(params)[first:]).replace("'", "")  # DEFAULT_TARGETS is shown by name
        actual = re.sub(r"targets=\(.*?\)", "targets=DEFAULT_TARGETS", actual)
        assert shown == f"{fn.__name__}({actual})", (shown, actual)


def test_results_page_is_what_make_results_writes_from_the_reports():
    # docs/RESULTS.md cannot drift from docs/results/: an edited figure there (or a report rewritten without
    # `make results`) fails here
    from scripts.results_page import PAGE, render

    assert PAGE.read_text() == render(), "docs/RESULTS.md differs from the reports: run `make results`"


CI = re.compile(r"[-+−]?\d+\.\d+ \[[-+−]?\d+\.\d+, [-+−]?\d+\.\d+\]")


def test_every_interval_the_readme_quotes_is_in_a_report():
    reports = "\n".join(p.read_text() for p in (ROOT / "docs" / "results").rglob("*.md"))
    quoted = CI.findall((ROOT / "README.md").read_text().replace("−", "-"))
    assert quoted, "the README quotes no interval"
    missing = [q for q in quoted if q not in reports]
    assert not missing, f"figures in README.md that no report under docs/results/ holds: {missing}"


def test_readme_tables_rows_are_the_reports_rows():
    readme = (ROOT / "README.md").read_text()
    reports = "\n".join(p.read_text() for p in (ROOT / "docs" / "results").rglob("*.md"))
    claims = ("| D2-LoRA(r) mean accuracy", "| D2-LoRA(r) generative", "| training-loss volatility")
    rows = [line for line in readme.splitlines() if line.startswith(claims)]
    assert rows and all(row in reports for row in rows)


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200
    top = "\n".join(lines[:40])
    assert "make compare" in top and "make test" in top and CI.search(top.replace("−", "-"))  # quick start, the answer


@pytest.mark.docs  # a learner's comment in a method file changes the count: CI runs this (pytest -m docs), make test not
def test_the_readmes_line_count_of_the_method_files_is_theirs():
    claimed = int(re.search(r"are (\d+) lines of PyTorch", (ROOT / "README.md").read_text()).group(1))
    files = ("base.py", "lora.py", "dora.py", "d2lora.py")
    assert claimed == sum(len((ROOT / "d2lora_min" / "nn" / f).read_text().splitlines()) for f in files)


def defines(path, test):
    """Whether the test file `path` (relative to tests/) defines the test function `test`."""
    file = ROOT / "tests" / path
    return file.is_file() and re.search(rf"^def {test}\(", file.read_text(), re.M) is not None


def test_every_test_the_design_names_as_a_guarantee_exists():
    # docs/DESIGN.md pins each file-safety guarantee to a test by name (its path under tests/): a renamed or moved
    # test must move the line too
    named = set(re.findall(r"((?:\w+/)*test_\w+\.py)::(test_\w+)", (ROOT / "docs" / "DESIGN.md").read_text()))
    assert len(named) >= 20
    missing = [f"{f}::{t}" for f, t in sorted(named) if not defines(f, t)]
    assert not missing, f"docs/DESIGN.md names tests that do not exist: {missing}"


def test_every_test_file_the_docs_and_docstrings_name_exists():
    # "tests/test_adapters.py" in the README after the tests moved to tests/nn/ would send a reader nowhere
    texts = [
        ROOT / "README.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "d2lora_min").rglob("*.py"),
        *(ROOT / "scripts").glob("*.py"),
    ]
    named = {
        (m[1], m[2]) for p in texts for m in re.finditer(r"tests/((?:\w+/)*\w+\.py)(?:::(test_\w+))?", p.read_text())
    }
    assert named
    missing = [f"tests/{f}" + (f"::{t}" if t else "") for f, t in sorted(named, key=str)
               if not (ROOT / "tests" / f).is_file() or (t and not defines(f, t))]  # fmt: skip
    assert not missing, f"the docs name test files or tests that do not exist: {missing}"
