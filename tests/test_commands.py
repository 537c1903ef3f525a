"""The `d2lora` console command (d2lora_min/commands.py): one entry point that lists the tools and hands each its flags."""

import importlib

import pytest

from d2lora_min.commands import COMMANDS, main


def test_the_d2lora_command_lists_its_tools_and_hands_each_its_flags(capsys):
    assert main([]) == 0
    listed = capsys.readouterr().out
    assert listed.startswith("usage: d2lora <command>") and all(name in listed for name in COMMANDS)
    assert main(["nope"]) == 2 and "usage: d2lora <command>" in capsys.readouterr().err
    assert all(callable(importlib.import_module(module).main) for module, _ in COMMANDS.values())
    with pytest.raises(SystemExit) as exit_:
        main(["compare", "--seeds", "abc"])  # compare's own usage error, under compare's name
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "d2lora compare: error: --seeds: expected an integer, got 'abc'" in err
