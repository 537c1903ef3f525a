"""Hugging Face folders out of this project (`d2lora export`): the shipped base as a standard transformers checkpoint,
a run's adapter as a PEFT adapter (LoRA, DoRA) or a merged model (D2-LoRA, which PEFT lacks), and the embedded tasks
as a --tasks folder.

    d2lora export base --out runs/hf_base          # base/ as an OPTForCausalLM folder
    d2lora export adapter --model DIR --adapter runs/compare/adapters/<run> --out runs/my_adapter
    d2lora export tasks --out runs/tasks           # the embedded tasks as JSONL files (own/tasks.py)

The base. tiny_gpt has OPT's parts: separate biased q, k, v and output projections, learned absolute positions,
pre-LayerNorm blocks, a GELU MLP of width 4 d, a final LayerNorm and a head tied to the token embedding. So it is an
OPTForCausalLM with do_layer_norm_before=True, activation_function="gelu" (the exact erf GELU, as F.gelu) and
tie_word_embeddings=True, whose position table holds tiny_gpt's rows at OPT's offset of 2 (OPT looks position p up in
row p + 2; rows 0 and 1 are zero and never read). The same logits to float rounding (tests/own/test_export.py).

PEFT's format, written out here (no PEFT import): a folder with adapter_config.json and adapter_model.safetensors
that `peft.PeftModel.from_pretrained(base, folder)` loads onto the transformers model the adapters were trained on.
Ours and PEFT's LoRA share their tensors: lora_A (r, in), lora_B (out, r), scaling alpha / r. DoRA adds the
magnitude (out,), PEFT's lora_magnitude_vector; its DoRA detaches the norm as ours does by default (and in eval mode
the two agree either way: tests/nn/test_peft.py). PEFT names a tensor after the module it adapts, under
"base_model.model.", the adapter's name left out: base_model.model.<module>.lora_A.weight, .lora_B.weight and, for
DoRA, .lora_magnitude_vector. target_modules lists every adapted module by its full name. A GPT-2 Conv1D converted to
nn.Linear keeps the same factors; PEFT wraps the Conv1D and is told fan_in_fan_out=true.
"""

import argparse
import copy
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..files.io import atomic_path, write_text
from ..nn import adapter_layers, load_adapters, merge_adapters
from ..nn.registry import method_name
from ..train.cli import UsageError, run_cli
from ..train.data import EOT
from ..train.pretrain import SHIPPED_BASE, load_base

OPT_OFFSET = 2  # OPTLearnedPositionalEmbedding looks position p up in row p + 2
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
OURS_AS_OPT = (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"), ("o_proj", "out_proj"))


def opt_from_tiny_gpt(gpt, pad_id=0):
    """An OPTForCausalLM holding tiny_gpt `gpt`'s weights (float32, eval mode)."""
    from transformers import OPTConfig, OPTForCausalLM

    c = gpt.config
    shape = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, word_embed_proj_dim=c.d_model, ffn_dim=4 * c.d_model,
                 num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                 max_position_embeddings=c.block_size)  # fmt: skip
    no_dropout = dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0)
    tokens = dict(pad_token_id=pad_id, bos_token_id=pad_id, eos_token_id=pad_id)
    config = OPTConfig(**shape, **no_dropout, **tokens, do_layer_norm_before=True, activation_function="gelu",
                       enable_bias=c.bias, tie_word_embeddings=True)  # fmt: skip
    opt = OPTForCausalLM(config).eval()
    d = opt.model.decoder
    with torch.no_grad():
        d.embed_tokens.weight.copy_(gpt.wte.weight)  # (vocab, d); the head is tied to it
        d.embed_positions.weight.zero_()
        d.embed_positions.weight[OPT_OFFSET:].copy_(gpt.wpe.weight)  # (block + 2, d)
        d.final_layer_norm.load_state_dict(gpt.ln_f.state_dict())
        for block, layer in zip(gpt.blocks, d.layers):
            layer.self_attn_layer_norm.load_state_dict(block.ln_1.state_dict())
            for ours, theirs in OURS_AS_OPT:
                getattr(layer.self_attn, theirs).load_state_dict(getattr(block.attn, ours).state_dict())
            layer.final_layer_norm.load_state_dict(block.ln_2.state_dict())
            layer.fc1.load_state_dict(block.mlp.fc_in.state_dict())
            layer.fc2.load_state_dict(block.mlp.fc_out.state_dict())
    return opt


def export_base(out, folder=SHIPPED_BASE):
    """Write a base folder (default: the shipped one) as an OPT checkpoint with its tokenizer.json -> out."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # (a bar for one small file)
    gpt, tokenizer, _ = load_base(folder)
    opt = opt_from_tiny_gpt(gpt, pad_id=tokenizer.token_to_id(EOT))
    out = Path(out)
    opt.save_pretrained(out)
    shutil.copyfile(Path(folder) / "tokenizer.json", out / "tokenizer.json")
    return out


def peft_tensors(model, prefix=""):
    """{PEFT's name: tensor} of every adapter layer, names taken without `prefix` (the wrapper's attribute path)."""
    layers = adapter_layers(model)
    if not layers:
        raise ValueError("model has no adapters")
    methods = {method_name(layer) for _, layer in layers}
    if methods - {"lora", "dora"}:
        others = ", ".join(sorted(methods - {"lora", "dora"}))
        raise ValueError(f"PEFT has no {others}: merge the adapters and save the merged model instead")
    tensors, names = {}, []
    for name, layer in layers:
        if prefix and not name.startswith(prefix):
            raise ValueError(f"adapter layer {name!r} is not under {prefix!r}")
        module = name[len(prefix) :]
        names.append(module)
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.detach()  # (r, in)
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.detach()  # (out, r)
        if hasattr(layer, "magnitude"):
            tensors[f"{key}.lora_magnitude_vector"] = layer.magnitude.detach()  # (out,)
    return {k: v.cpu().contiguous() for k, v in tensors.items()}, names, layers[0][1]


def save_peft(model, folder, prefix="", fan_in_fan_out=False, base_name=None):
    """Write the LoRA or DoRA adapters of `model` (prefix "hf." for own.model's wrapper, whose transformers model is
    .hf) as a PEFT adapter folder -> the folder's path."""
    tensors, modules, layer = peft_tensors(model, prefix)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": layer.r, "lora_alpha": layer.alpha,
        "lora_dropout": layer.dropout, "target_modules": sorted(modules), "use_dora": method_name(layer) == "dora",
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "inference_mode": True, "base_model_name_or_path": base_name,
        "init_lora_weights": True,
    }  # fmt: skip
    os.makedirs(folder, exist_ok=True)
    with atomic_path(os.path.join(folder, PEFT_WEIGHTS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_text(os.path.join(folder, PEFT_CONFIG), json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def linear_to_conv1d(model, names):
    """The inverse of model.conv1d_to_linear for `names` (in place): a stock GPT-2 then loads what save_pretrained
    writes."""
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = model.get_submodule(name)
        conv = Conv1D(linear.out_features, linear.in_features).to(linear.weight)
        with torch.no_grad():
            conv.weight.copy_(linear.weight.T)  # (in, out)
            conv.bias.copy_(linear.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, conv)


def save_merged(model, out):
    """Merge a copy of the wrapped, adapted model and save it with save_pretrained (Conv1D turned back, so that the
    model's own class loads it) -> out."""
    merged = merge_adapters(copy.deepcopy(model))
    linear_to_conv1d(merged.hf, merged.converted)
    merged.hf.save_pretrained(out)
    return Path(out)


def export_adapter(model_dir, adapter_dir, out, context=1024):
    """A run's adapter file, loaded onto the model it was trained on (checked by the base weights' SHA-256), written
    as a PEFT adapter (LoRA, DoRA) or as a merged model (D2-LoRA) -> (out, what was written)."""
    from .model import load

    model, _, _, folder = load(model_dir, context)
    try:
        load_adapters(model, adapter_dir)
    except (ValueError, OSError) as e:
        raise UsageError(f"--adapter {adapter_dir}: {str(e).splitlines()[0]}") from None
    out = Path(out)
    if method_name(adapter_layers(model)[0][1]) == "d2lora":
        save_merged(model, out)
        shutil.copyfile(folder / "tokenizer.json", out / "tokenizer.json")
        return out, "merged model (PEFT has no D2-LoRA)"
    save_peft(model, out, prefix="hf.", fan_in_fan_out=bool(model.converted), base_name=str(folder.resolve()))
    return out, "PEFT adapter"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["tasks"]:  # the embedded tasks' writer takes compare's settings: its own parser (own/tasks.py)
        from .tasks import main as tasks_main

        return tasks_main(argv[1:])
    parser = argparse.ArgumentParser(prog="d2lora export", epilog=__doc__,
                                     description="The shipped base as OPT, an adapter for PEFT, the tasks as JSONL.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="what", required=True)
    base = sub.add_parser("base", help="the shipped base (or --base DIR) as an OPTForCausalLM folder")
    base.add_argument("--base", default=str(SHIPPED_BASE))
    base.add_argument("--out", required=True)
    adapter = sub.add_parser("adapter", help="a run's adapter as a PEFT adapter, or a merged model for D2-LoRA")
    adapter.add_argument("--model", required=True, help="the model folder the adapter was trained on")
    adapter.add_argument("--adapter", required=True, help="the run's adapter folder (runs/compare/adapters/...)")
    adapter.add_argument("--out", required=True)
    sub.add_parser("tasks", help="the embedded tasks as a --tasks folder (d2lora export tasks --help)")
    args = parser.parse_args(argv)

    def body():
        if Path(args.out).exists() and (not Path(args.out).is_dir() or any(Path(args.out).iterdir())):
            raise UsageError(f"--out {args.out} is not an empty folder: choose a new one")
        if args.what == "base":
            print(f"written: {export_base(args.out, args.base)} (OPTForCausalLM, tokenizer.json)")
        else:
            out, what = export_adapter(args.model, args.adapter, args.out)
            print(f"written: {out} ({what})")
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
