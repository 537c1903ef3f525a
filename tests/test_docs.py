"""The code in the docs runs and says what it claims."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_porting_snippet_checks_the_golden_file(monkeypatch, capsys):
    text = (ROOT / "docs" / "PORTING.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    monkeypatch.chdir(ROOT)
    exec(compile(snippet, "PORTING.md", "exec"), {})
    assert "forward and merged weight match" in capsys.readouterr().out
