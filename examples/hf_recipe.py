"""LoRA, DoRA and D2-LoRA on a Hugging Face transformers model, start to finish, on CPU in seconds.

What it shows, for every method in d2lora_min.nn.METHODS:

1. build a small causal LM from a transformers config (LlamaConfig: random weights, nothing downloaded);
2. inject the method into the attention projections by module-name suffix (q_proj, k_proj, v_proj, o_proj);
3. fine-tune a few steps with a plain PyTorch loop on random token batches, the Hugging Face way;
4. check that the loss went down, that every adapter tensor moved and that the base did not change bit for bit;
5. merge the adapters into plain nn.Linear layers and check that the logits did not change.

Then the same on GPT-2, whose projections are transformers' Conv1D (weight stored (in, out), the transpose
of nn.Linear's): inject_adapters refuses Conv1D, conv1d_to_linear() below converts it to nn.Linear without
changing the logits, and every method then goes onto c_attn and attn.c_proj.

    .venv/bin/python examples/hf_recipe.py

Needs transformers (make test installs it; pip install transformers); the rest of the project does not.

Notes for your own model:
- Targets are module-name suffixes: pass the model's own, e.g. ("q_proj", "k_proj", "v_proj", "o_proj") for Llama,
  Mistral or Qwen (DEFAULT_TARGETS are tiny_gpt's six linears). A dotted suffix picks one of two modules with the same
  last name: GPT-2's "attn.c_proj" leaves mlp.c_proj alone.
- A transformers causal LM takes labels equal to the input ids (it shifts them inside), ignores label -100 and
  returns .loss and .logits, where this project's trainer expects model(x, y) -> (logits, loss) with y shifted and -1
  ignored; hence the plain PyTorch loop below (AdamW on what requires grad: the adapters).
- merge_adapters(model) leaves an ordinary transformers model with the same logits. A converted GPT-2 keeps
  nn.Linear where it had Conv1D, so save_pretrained writes those weights (out, in): transpose them back into Conv1D
  before saving for a stock GPT2LMHeadModel.from_pretrained.
"""

import copy
import sys
from pathlib import Path

import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this repository's d2lora_min, installed or not
from d2lora_min.nn import METHODS, adapter_layers, display_name, inject_adapters, merge_adapters  # noqa: E402

VOCAB = 64  # a tiny vocabulary: the point is the plumbing, not the language
SEQ_LEN = 16
BATCH = 16
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # suffixes: "q_proj" matches "model.layers.0.self_attn.q_proj"
GPT2_TARGETS = ("c_attn", "attn.c_proj")  # "c_proj" alone would also match the MLP's mlp.c_proj
MERGE_TOL = 1e-4  # max abs logit difference allowed between the merged and the unmerged model (float32)
CONVERT_TOL = 1e-6  # the same, Conv1D against its nn.Linear (the same products; a BLAS may still round them apart)


def tiny_llama(seed):
    """A 2-layer Llama with random weights: a config and a constructor, no download, no from_pretrained."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN,
        bos_token_id=0,  # the defaults (1, 2) are fine at VOCAB 64; set them anyway, as GPT-2's must be
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()  # a model built from a config starts in train mode


def tiny_gpt2(seed):
    """A 2-layer GPT-2 with random weights. Its c_attn, c_proj, c_fc are Conv1D, not nn.Linear."""
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=SEQ_LEN,
        n_embd=32,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,  # no dropout, so that two forward passes can be compared exactly
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,  # the default 50256 lies outside a 64-token vocabulary (transformers warns)
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    # transformers 5 logs "`loss_type=None` was set in the config but it is unrecognized" once for this class
    # (its name does not end in ForCausalLM); it then uses the causal-LM loss, which is the right one.
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def conv1d_to_linear(model):
    """Replace every transformers Conv1D of `model` by the nn.Linear that computes the same thing (in place).

    Conv1D computes x @ weight + bias with weight (in, out); nn.Linear computes x @ weight.T + bias with
    weight (out, in). So the Linear's weight is the Conv1D's, transposed, and the bias is the same.
    """
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in convs:
        in_features, out_features = conv.weight.shape  # (in, out)
        linear = nn.Linear(
            in_features, out_features, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype
        )
        linear.weight.copy_(conv.weight.T)  # (out, in)
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)  # (out,)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, linear)
    return model


def counting_batch(generator, batch=BATCH):
    """Random token batches with something to learn: each row counts up from a random start, mod VOCAB.

    -> (batch, SEQ_LEN) token ids, e.g. [61, 62, 63, 0, 1, ...]
    """
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)  # (batch, 1)
    return (start + torch.arange(SEQ_LEN)) % VOCAB  # (batch, SEQ_LEN)


def lm_loss(model, tokens):
    """The next-token loss, the Hugging Face way.

    A transformers causal LM takes labels = the input ids themselves (it shifts them by one inside), ignores
    label -100 (e.g. padding or prompt tokens) and returns an output object with .loss and .logits.
    This project's own trainer (d2lora_min/train/trainer.py) expects model(x, y) -> (logits, loss) with y
    already shifted and -1 as the ignore index, so it does not drive a transformers model as it is; a plain
    loop does.
    """
    return model(input_ids=tokens, labels=tokens).loss


def finetune(model, steps, seed, lr=1e-2):
    """A plain PyTorch loop: AdamW on whatever requires grad (after inject_adapters: the adapters only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        loss = lm_loss(model, counting_batch(generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def adapt_train_merge(base, method, targets, steps, seed):
    """Copy `base`, put `method` on `targets`, fine-tune, merge; measure what each stage must keep."""
    model = copy.deepcopy(base)  # every method starts from the same base weights
    inject_adapters(model, method, r=4, alpha=8, targets=targets)  # freezes the base, wraps each target
    # The adapter tensors are the parameters of each adapter layer outside its wrapped `base` nn.Linear
    # (lora_A, lora_B, ...); everything else, the wrapped layers' weights included, is the base model.
    adapter_names = {
        f"{name}.{p}"
        for name, layer in adapter_layers(model)
        for p, _ in layer.named_parameters()
        if not p.startswith("base.")
    }
    params = dict(model.named_parameters())
    adapters = {n: p.detach().clone() for n, p in params.items() if n in adapter_names}
    frozen = {n: p.detach().clone() for n, p in params.items() if n not in adapter_names}
    eval_tokens = counting_batch(torch.Generator().manual_seed(seed + 1000), batch=64)  # held-out rows

    with torch.no_grad():
        loss_before = lm_loss(model, eval_tokens).item()
    finetune(model, steps, seed)
    with torch.no_grad():
        loss_after = lm_loss(model, eval_tokens).item()
        logits = model(input_ids=eval_tokens).logits  # (64, SEQ_LEN, VOCAB), through the adapters

    row = {
        "adapted_layers": len(adapter_layers(model)),
        "trainable": sum(t.numel() for t in adapters.values()),
        "only_adapters_trainable": {n for n, p in params.items() if p.requires_grad} == adapter_names,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "adapters_moved": all(not torch.equal(params[n], t) for n, t in adapters.items()),
        "base_unchanged": all(torch.equal(params[n], t) for n, t in frozen.items()),
    }

    merge_adapters(model)  # in place: every adapter layer becomes a plain nn.Linear
    with torch.no_grad():
        merged_logits = model(input_ids=eval_tokens).logits
    row["merged_max_abs_diff"] = (merged_logits - logits).abs().max().item()
    row["adapters_left"] = len(adapter_layers(model))
    row["ok"] = (
        loss_after < loss_before
        and row["only_adapters_trainable"]
        and row["adapters_moved"]
        and row["base_unchanged"]
        and row["merged_max_abs_diff"] <= MERGE_TOL
        and row["adapters_left"] == 0
    )
    return row


def gpt2_conversion(seed):
    """GPT-2: the refusal of Conv1D, and the conversion that lifts it without changing the logits."""
    gpt2 = tiny_gpt2(seed)
    try:
        inject_adapters(copy.deepcopy(gpt2), "lora", targets=GPT2_TARGETS)
        refusal = None
    except TypeError as error:
        refusal = str(error)  # names Conv1D's (in, out) layout and the conversion

    tokens = counting_batch(torch.Generator().manual_seed(seed), batch=8)
    with torch.no_grad():
        before = gpt2(input_ids=tokens).logits
        conv1d_to_linear(gpt2)
        after = gpt2(input_ids=tokens).logits
    return gpt2, {
        "refusal": refusal,
        "conv1d_left": sum(isinstance(m, Conv1D) for m in gpt2.modules()),
        "max_abs_diff": (after - before).abs().max().item(),  # 0.0 here: the same products, the same sums
    }


def main(steps=30, seed=0):
    """Every method on a tiny Llama and on a converted tiny GPT-2 -> {"llama": {method: row}, "gpt2": ...}."""
    llama = tiny_llama(seed)
    gpt2, conversion = gpt2_conversion(seed)
    return {
        "llama": {m: adapt_train_merge(llama, m, LLAMA_TARGETS, steps, seed) for m in METHODS},
        "gpt2": {m: adapt_train_merge(gpt2, m, GPT2_TARGETS, steps, seed) for m in METHODS},
        "gpt2_conversion": conversion,
    }


if __name__ == "__main__":
    results = main()
    print(
        "| model | method | layers | trainable | loss before -> after | adapters moved | base unchanged"
        " | merged max abs logit diff | adapters left | ok |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name in ("llama", "gpt2"):
        for method, row in results[model_name].items():
            print(
                f"| {model_name} | {display_name(method)} | {row['adapted_layers']} | {row['trainable']:,} |"
                f" {row['loss_before']:.3f} -> {row['loss_after']:.3f} | {row['adapters_moved']} |"
                f" {row['base_unchanged']} | {row['merged_max_abs_diff']:.1e} | {row['adapters_left']} |"
                f" {row['ok']} |"
            )
    conversion = results["gpt2_conversion"]
    print(
        f"\nGPT-2 Conv1D -> nn.Linear: max abs logit change {conversion['max_abs_diff']:.1e},"
        f" {conversion['conv1d_left']} Conv1D left"
    )
    print(f"before converting, inject_adapters said: {conversion['refusal']}")
    rows = [row for name in ("llama", "gpt2") for row in results[name].values()]
    sys.exit(0 if all(row["ok"] for row in rows) and conversion["max_abs_diff"] <= CONVERT_TOL else 1)
