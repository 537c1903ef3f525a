"""A local Hugging Face causal LM as the base (`--model DIR`, d2lora_min/own/model.py): every architecture with default
targets loads, packs and decodes as tiny_gpt does; bad model folders and an architecture without default targets are
refused in one line before any work, and so is --model without transformers."""

import sys

import pytest

pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")

import d2lora_min.train.compare as compare_mod  # noqa: E402
from d2lora_min.nn import inject_adapters  # noqa: E402
from d2lora_min.own import model as own_model  # noqa: E402
from d2lora_min.train.compare import main as compare_main  # noqa: E402

from .folders import model_folder, tokenizer_for, write_tasks  # noqa: E402


@pytest.mark.parametrize("kind, targets", [("gpt2", ("c_attn", "attn.c_proj")),
                                           ("opt", ("q_proj", "k_proj", "v_proj", "out_proj")),
                                           ("neox", ("query_key_value", "attention.dense"))])  # fmt: skip
def test_every_default_architecture_loads_packs_and_takes_its_default_targets(tmp_path, kind, targets):
    model, _, meta, _ = own_model.load(model_folder(tmp_path / kind, kind), context=1024)  # load runs the packing check
    assert own_model.default_targets(model.hf.config, model.hf) == targets
    assert bool(meta["converted_conv1d"]) == (kind == "gpt2")
    inject_adapters(model, "d2lora", r=2, alpha=4, targets=targets)
    own_model.check_packing(model)  # adapted (B = 0) it still packs, decodes and pads as tiny_gpt does


def refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_bad_model_folders_are_refused_in_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare_mod, "run_one", lambda *a, **k: pytest.fail("work started"))
    out = ["--out", str(tmp_path / "out")]
    hub = refused(["--model", "meta-llama/Llama-3.2-1B", *out], capsys)
    assert "looks like a Hugging Face Hub name; download it first" in hub
    assert "no such folder" in refused(["--model", str(tmp_path / "nowhere"), *out], capsys)
    good = model_folder(tmp_path / "llama")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((good / "config.json").read_text())
    (broken / "pytorch_model.bin").write_bytes(b"")
    msg = refused(["--model", str(broken), *out], capsys)
    assert "no model.safetensors" in msg and "pickled weights are not loaded" in msg
    (broken / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    assert "no tokenizer.json" in refused(["--model", str(broken), *out], capsys)
    tasks = write_tasks(tmp_path / "tasks")
    msg = refused(["--model", str(good), "--tasks", str(tasks), "--model_context=10", *out], capsys)
    assert f"{tasks / 'what.jsonl'}:1: prompt and answer take" in msg and "more than the context of 10" in msg
    assert "r must be in [1, 32]" in refused(["--model", str(good), "--r=33", *out], capsys)  # the model's width


def test_an_architecture_without_default_targets_lists_its_linear_modules(tmp_path, capsys):
    import transformers as t

    tokenizer = tokenizer_for()
    config = t.PhiConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)  # fmt: skip
    t.PhiForCausalLM(config).save_pretrained(tmp_path / "phi")
    tokenizer.save(str(tmp_path / "phi" / "tokenizer.json"))
    tasks = write_tasks(tmp_path / "tasks")
    argv = ["--model", str(tmp_path / "phi"), "--tasks", str(tasks), "--out", str(tmp_path / "o")]
    msg = refused(argv, capsys)
    assert "no default targets for model type 'phi'" in msg and "q_proj" in msg and "fc1" in msg and "dense" in msg
    assert compare_main(argv + ["--targets=q_proj,v_proj", "--methods", "lora", "--reference=lora", "--seeds=0",
                                "--epochs=1", "--train.progress=false", "--checkpoints=1"]) == 0  # fmt: skip


def test_without_transformers_a_model_is_a_usage_error_that_says_what_to_install(tmp_path, capsys, monkeypatch):
    folder = model_folder(tmp_path / "llama")
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an environment without it gives: ImportError
    assert "--model needs transformers: pip install -e '.[hf]'" in refused(["--model", str(folder)], capsys)
