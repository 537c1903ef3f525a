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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_porting_checksum_is_the_one_adapter_files_carry(tmp_path, dtype):
    from safetensors import safe_open
    from safetensors.numpy import load_file

    from d2lora_min.nn import inject_adapters, save_adapters
    from d2lora_min.nn.checkpoint import CHECKSUM_KEY, CONFIG_KEY

    snippet = porting_snippets()[1]
    names = {}
    exec(compile(snippet, "PORTING.md", "exec"), names)
    base = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 4)).to(dtype)
    model = inject_adapters(base, "d2lora", r=2, alpha=4, targets=("0", "1"))
    path = save_adapters(model, tmp_path)
    with safe_open(path, framework="np") as f:
        metadata = f.metadata()
    assert json.loads(metadata[CONFIG_KEY])["format"] == 4
    assert names["adapter_sha256"](metadata[CONFIG_KEY], load_file(path)) == metadata[CHECKSUM_KEY]


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
