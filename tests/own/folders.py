"""Small local Hugging Face folders for the --model tests: a random 2-layer model of a given architecture saved with
save_pretrained, its tokenizer.json trained on the task text (byte-level BPE, with <|endoftext|>), and tiny JSONL
tasks. Nothing is downloaded."""

import json

import torch

from d2lora_min.train.data import train_tokenizer

PEOPLE = ["Mira", "Kalo", "Rava", "Gubo", "Sepi", "Nati"]
THINGS = ["cup", "hat", "pen", "map", "kite", "ring"]


def tiny_tasks():
    """{task: [line]}: a multiple-choice task (who has a thing) and a generation task (what a person has); 12
    training, 4 validation and 8 test items each."""
    who, what = [], []
    for i in range(24):
        split = "train" if i < 12 else "validation" if i < 16 else "test"
        a, b = PEOPLE[i % 6], PEOPLE[(i + 1) % 6]
        x, y = THINGS[i % 6], THINGS[(i + 2) % 6]
        story = f"{a} has the {x}. {b} has the {y}. Story {i}."
        choices = [f" {a}", f" {b}"] if i % 2 else [f" {b}", f" {a}"]  # the right one first or second
        right = choices.index(f" {a}")
        who.append({"split": split, "prompt": f"{story}\nQ: Who has the {x}?\nA:", "choices": choices, "answer": right})
        prompt = f"{story}\nQ: What does {b} have?\nA:"
        what.append({"split": split, "prompt": prompt, "target": f"the {y}", "cluster": b})
    return {"who": who, "what": what}


def write_tasks(folder, tasks=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in (tasks or tiny_tasks()).items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def tokenizer_for(tasks=None):
    lines = [line for lines in (tasks or tiny_tasks()).values() for line in lines]
    texts = [line["prompt"] + " " + " ".join(line.get("choices", [line.get("target", "")])) for line in lines]
    return train_tokenizer(texts * 4, 320)


def tiny_model(kind, vocab, seed=0):
    """A random 2-layer causal LM of architecture `kind` (llama, gpt2, opt, neox), width 32, no dropout."""
    import transformers as t

    torch.manual_seed(seed)
    common = {"vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    if kind == "llama":
        config = t.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=256, **common)  # fmt: skip
        return t.LlamaForCausalLM(config)
    if kind == "gpt2":
        config = t.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
                              attn_pdrop=0.0, **common)  # fmt: skip
        return t.GPT2LMHeadModel(config)
    if kind == "opt":
        config = t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=128, word_embed_proj_dim=32, dropout=0.0, **common)  # fmt: skip
        return t.OPTForCausalLM(config)
    if kind == "neox":
        config = t.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=128, **common)  # fmt: skip
        return t.GPTNeoXForCausalLM(config)
    raise ValueError(kind)


def model_folder(folder, kind="llama", seed=0):
    """A local model folder: config.json, model.safetensors, tokenizer.json -> folder."""
    tokenizer = tokenizer_for()
    tiny_model(kind, tokenizer.get_vocab_size(), seed).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder
