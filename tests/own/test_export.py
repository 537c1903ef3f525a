"""Back to the ecosystem (d2lora_min/own/export.py): tiny_gpt exported as OPT gives its logits; LoRA and DoRA adapters
exported in PEFT's format load with PeftModel.from_pretrained and give the same logits; D2-LoRA's merged model loads
with from_pretrained and gives the same logits; the documented way to load an adapter and generate runs."""

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed: pip install -e '.[hf]'")

from d2lora_min.nn import adapter_layers, inject_adapters, save_adapters  # noqa: E402
from d2lora_min.own import export, model as own_model  # noqa: E402
from d2lora_min.train.evaluate import greedy_generate  # noqa: E402
from d2lora_min.train.pretrain import load_base  # noqa: E402
from tiny_gpt import GPT, GPTConfig, packing  # noqa: E402

from ..helpers import perturb_adapters  # noqa: E402
from .folders import model_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@torch.no_grad()
def logit_gap(gpt, opt):
    """Largest |logit difference| of tiny_gpt and its OPT export over plain rows and packed rows, and its scale."""
    torch.manual_seed(1)
    x = torch.randint(0, gpt.config.vocab_size, (4, gpt.config.block_size))
    positions, mask = packing(torch.tensor([[0] * 50 + [1] * (gpt.config.block_size - 50)] * 4))
    packed = {"positions": positions, "attn_mask": mask}
    pairs = [(gpt(x)[0], opt(x)[0]), (gpt(x, **packed)[0], opt(x, **packed)[0])]
    return max((a - b).abs().max().item() for a, b in pairs), max(a.abs().max().item() for a, _ in pairs)


def test_tiny_gpt_exported_as_opt_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    random_gpt = GPT(GPTConfig(vocab_size=1280, block_size=128)).eval()  # the measurement: random weights
    gap, scale = logit_gap(random_gpt, own_model.HFCausalLM(export.opt_from_tiny_gpt(random_gpt), 128).eval())
    print(f"random tiny_gpt -> OPT: max |logit difference| {gap:.1e} (logits up to {scale:.2f})")
    assert gap <= 1e-5 * scale
    shipped, tokenizer, _ = load_base()
    assert export.main(["base", "--out", str(tmp_path / "opt")]) == 0  # `d2lora export base`
    opt, hf_tokenizer, _, _ = own_model.load(tmp_path / "opt", context=1024)  # through the folder
    gap, scale = logit_gap(shipped, opt)
    print(f"shipped base -> OPT folder: max |logit difference| {gap:.1e} (logits up to {scale:.2f})")
    assert gap <= 1e-5 * scale
    assert opt.config.block_size == shipped.config.block_size == 128
    prompts = ["The cup belongs to Mira. The hat belongs to Kalo.\nQ: Who owns the hat?\nA:", "Mira has the red cup."]
    assert greedy_generate(opt, hf_tokenizer, prompts, 8)[0] == greedy_generate(shipped, tokenizer, prompts, 8)[0]


def adapted(tmp_path, kind, method):
    """A random model folder, loaded through --model's loader, with `method` on its default targets and every adapter
    tensor moved away from its start (B = 0 would hide a wrong export)."""
    folder = model_folder(tmp_path / kind, kind)
    model, tokenizer, _, _ = own_model.load(folder, context=1024)
    inject_adapters(model, method, r=2, alpha=4, targets=own_model.default_targets(model.hf.config, model.hf))
    perturb_adapters(model, seed=1)
    return folder, model.eval(), tokenizer


@torch.no_grad()
def gap(ours, theirs):
    x = torch.randint(0, ours.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    a, b = ours(x)[0], theirs(input_ids=x).logits
    return (a - b).abs().max().item(), a.abs().max().item()


def export_adapter(*argv):
    return export.main(["adapter", *map(str, argv)])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_lora_and_dora_exported_for_peft_load_with_peft_and_give_the_same_logits(tmp_path, kind, method):
    pytest.importorskip("peft", reason="peft is not installed: pip install -e '.[peft]' to run the round trips")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folder, model, _ = adapted(tmp_path, kind, method)
    export.save_peft(model, tmp_path / "peft", prefix="hf.", fan_in_fan_out=bool(model.converted))
    theirs = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), tmp_path / "peft").eval()
    assert sum("lora_A" in n for n, _ in theirs.named_parameters()) == len(adapter_layers(model))  # every one found
    diff, scale = gap(model, theirs)
    print(f"{kind} {method}: PEFT against ours, max |logit difference| {diff:.1e} (logits up to {scale:.2f})")
    assert diff <= 1e-5 * max(1.0, scale)  # the same products in another order: float32 rounding


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_d2lora_exports_its_merged_model_which_loads_with_from_pretrained(tmp_path, kind):
    from transformers import AutoModelForCausalLM

    folder, model, _ = adapted(tmp_path, kind, "d2lora")
    save_adapters(model, tmp_path / "adapter")  # what a compare run saves
    assert export_adapter("--model", folder, "--adapter", tmp_path / "adapter", "--out", tmp_path / "m") == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()  # its own class: GPT-2's Conv1D is back
    diff, scale = gap(model, merged)
    print(f"{kind} d2lora: merged and saved against ours, max |logit difference| {diff:.1e}")
    # a merge adds s B A into W0 once: float32 rounding of a weight-sized sum (examples/hf_recipe.py's MERGE_TOL)
    assert diff <= 1e-4 * max(1.0, scale) and (tmp_path / "m" / "tokenizer.json").is_file()


def test_an_adapter_onto_another_base_or_into_a_full_folder_is_refused_in_one_line(tmp_path, capsys):
    _, model, _ = adapted(tmp_path, "llama", "lora")
    save_adapters(model, tmp_path / "adapter")
    other = model_folder(tmp_path / "other", seed=1)
    for out in (tmp_path / "x", tmp_path / "adapter"):  # another base; an --out that holds files
        with pytest.raises(SystemExit) as exit_info:
            export_adapter("--model", other, "--adapter", tmp_path / "adapter", "--out", out)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_info.value.code == 2 and ("--adapter" in err if out.name == "x" else "not an empty folder" in err)


def test_the_documented_way_to_load_an_adapter_and_generate_runs(tmp_path, capsys):
    pytest.importorskip("peft", reason="peft is not installed: pip install -e '.[peft]'")
    folder, model, tokenizer = adapted(tmp_path, "llama", "dora")
    save_adapters(model, tmp_path / "adapter")
    assert export_adapter("--model", folder, "--adapter", tmp_path / "adapter", "--out", tmp_path / "p") == 0
    design = (ROOT / "docs" / "DESIGN.md").read_text()
    snippet = re.search(r"```python\n(model_dir, adapter_dir = .*?)```", design, re.S).group(1)
    here = f"model_dir, adapter_dir = {str(folder)!r}, {str(tmp_path / 'p')!r}"
    snippet = re.sub(r"model_dir, adapter_dir = .*", here, snippet)
    capsys.readouterr()
    exec(compile(snippet, "DESIGN.md", "exec"), {})
    prompt = re.search(r'prompt = "(.*?)"', snippet).group(1).encode().decode("unicode_escape")
    expected = greedy_generate(model, tokenizer, [prompt], 10)[0][0]
    assert capsys.readouterr().out.strip() == expected.strip()
