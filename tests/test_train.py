"""The shared trainer, the data, the tasks, the scorers and the compare plumbing (never timed)."""

import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from d2lora_min.nn import adapter_state_dict, inject_adapters
from d2lora_min.train.cli import apply_overrides
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.presets import CompareConfig, check_compare_config
from d2lora_min.train.specs import parse_method_spec
from d2lora_min.train.data import read_text_file, window_batches
from d2lora_min.train.evaluate import GenItem, MCItem, greedy_generate, mc_accuracy, rouge_l_f1, score_choices
from d2lora_min.train.data import heldout_text
from d2lora_min.train.batches import finetune_batches, steps_for
from d2lora_min.train.tasks import TASKS, answer_text, build_splits, retention_probe, updated_facts
from d2lora_min.train.tokenizer import EOT, train_tokenizer
from d2lora_min.train.resume import CHECKPOINT, read_checkpoint_state
from d2lora_min.train.trainer import TrainConfig, TrainingDiverged, lr_at, train
from d2lora_min.train.world import SCRIPTS, World, corpus_documents
from tiny_gpt import GPT, GPTConfig

# --- a tiny counting task every trainer test shares -----------------------------------------------------------------

VOCAB, BLOCK = 16, 12


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, d_model=16))


def count_batches(batch_size=8, seed=0):
    """Sequences 'k, k+1, k+2, ...' (mod VOCAB) from a random start: each token predicts the next."""

    def get_batch(step):
        g = torch.Generator().manual_seed(seed * 1000 + step)
        start = torch.randint(0, VOCAB, (batch_size, 1), generator=g)
        seq = (start + torch.arange(BLOCK + 1)) % VOCAB  # (B, T + 1)
        return seq[:, :-1], seq[:, 1:]

    return get_batch


def quiet(**kw):
    return TrainConfig(progress=False, lr=1e-2, warmup_steps=2, **kw)


def test_trainer_lowers_the_loss():
    result = train(tiny_model(), count_batches(), quiet(steps=60))
    assert len(result.losses) == 60 and len(result.step_times) == 60
    assert np.mean(result.losses[-10:]) < 0.7 * np.mean(result.losses[:5])


def test_fine_tuning_through_the_trainer_changes_only_adapter_tensors():
    model = tiny_model()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    inject_adapters(model, "d2lora", r=2, alpha=4, learn_tau=True)
    adapters_before = {n: t.clone() for n, t in adapter_state_dict(model).items()}
    train(model, count_batches(), quiet(steps=5, weight_decay=0.1))
    now = {n.replace(".base.", "."): p for n, p in model.named_parameters()}
    assert all(torch.equal(now[n], t) for n, t in base_before.items())
    moved = [n for n, t in adapter_state_dict(model).items() if not torch.equal(t, adapters_before[n])]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved) and any(n.endswith("tau") for n in moved)
    assert all(not torch.equal(t, adapters_before[n]) for n, t in adapter_state_dict(model).items() if "lora_B" in n)


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path):
    cfg = quiet(steps=12, checkpoint_every=4)
    full = tiny_model()
    inject_adapters(full, "dora", r=2, alpha=4)
    expected = train(full, count_batches(), cfg)

    class Interrupt(Exception):
        pass

    def stop_at_7(step, model, result):
        if step == 7:
            raise Interrupt

    first = tiny_model()
    inject_adapters(first, "dora", r=2, alpha=4)
    with pytest.raises(Interrupt):
        train(first, count_batches(), cfg, out_dir=tmp_path, callback=stop_at_7)
    assert read_checkpoint_state(tmp_path / CHECKPOINT)["step"] == 4  # the last checkpoint before the stop

    again = tiny_model()
    inject_adapters(again, "dora", r=2, alpha=4)
    resumed = train(again, count_batches(), cfg, out_dir=tmp_path)
    assert resumed.resumed_from == 4
    assert resumed.losses == expected.losses
    for (n, a), (_, b) in zip(full.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), n


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()

    def poison_after_6(step, model, result):
        if step == 6:
            with torch.no_grad():
                model.blocks[0].mlp.fc_in.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 6.*last good checkpoint \(step 4\)"):
        train(model, count_batches(), quiet(steps=20, checkpoint_every=4), out_dir=tmp_path, callback=poison_after_6)
    state = read_checkpoint_state(tmp_path / CHECKPOINT)
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_adapter_magnitude_and_tau_are_not_weight_decayed():
    from d2lora_min.train.trainer import param_groups

    for method, options, name in (("dora", {}, "magnitude"), ("d2lora", {"learn_tau": True}, "tau")):
        model = inject_adapters(tiny_model(), method, r=2, alpha=4, **options)
        decayed, plain = param_groups(model, 0.1)
        assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() < 2 for p in plain["params"])
        layer = model.blocks[0].attn.q_proj
        assert plain["weight_decay"] == 0.0 and any(p is getattr(layer, name) for p in plain["params"]), method
        assert not any(p is getattr(layer, name) for p in decayed["params"]), method


# --- scorers ---------------------------------------------------------------------------------------------------


class BigramModel(nn.Module):
    """A stand-in language model: the logits at a position depend only on the token there (a lookup table)."""

    def __init__(self, table):
        super().__init__()
        self.table = nn.Parameter(table)  # (vocab, vocab): row = current token, column = next token
        self.config = GPTConfig(vocab_size=table.shape[0], block_size=64)

    def forward(self, idx, targets=None, positions=None, attn_mask=None, cache=None):
        return self.table[idx], None  # (B, T, vocab): the token alone decides, so positions and masks change nothing


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["go yes no red blue green stop"] * 50 + ["Q: A:\n"] * 10, vocab_size=300)


def one_token(tok, text):
    ids = tok.encode(text).ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def test_scorer_picks_the_likely_choice_and_normalisation_matters(tokenizer):
    tok = tokenizer
    go, yes, no, red, blue = (one_token(tok, t) for t in ("go", " yes", " no", " red", " blue"))
    V = tok.get_vocab_size()
    table = torch.full((V, V), -20.0)
    table[go, yes], table[go, no], table[go, red] = 2.0, 0.0, 1.5  # after "go": yes > red > no
    table[red, blue] = 5.0  # after "red": almost surely "blue"
    model = BigramModel(table)
    acc, preds, _ = mc_accuracy(model, tok, [MCItem("go", [" no", " yes"], 1)])
    assert acc == 1.0 and preds == [1]
    # " red blue" (two tokens, each likely) vs " yes" (one token): summed prefers " yes", per-token " red blue"
    summed, per_token, _ = score_choices(model, tok, [MCItem("go", [" yes", " red blue"], 0)])
    assert summed[0][0] > summed[0][1] and per_token[0][1] > per_token[0][0]
    assert mc_accuracy(model, tok, [MCItem("go", [" yes", " red blue"], 0)], normalise=True)[0] == 0.0


def test_batched_scores_equal_one_item_at_a_time(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=1, n_head=2, d_model=16)).eval()
    items = [MCItem("Q: go" + " red" * k + "\nA:", [" yes", " no", " red blue"], 0) for k in range(6)]
    batched, _, _ = score_choices(model, tokenizer, items)
    for item, row in zip(items, batched):
        alone, _, _ = score_choices(model, tokenizer, [item])
        assert np.allclose(alone[0], row, atol=1e-5)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tokenizer):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), block_size=32, n_layer=1, n_head=2, d_model=16)).eval()
    prompts = ["go", "go red", "Q: go red blue\nA:", "stop"]
    batched, _ = greedy_generate(model, tokenizer, prompts, max_new_tokens=5, stop="\x00")
    for p, out in zip(prompts, batched):
        ids = torch.tensor([tokenizer.encode(p).ids])
        new = model.generate(ids, 5, greedy=True)[0, ids.shape[1] :].tolist()
        assert out == tokenizer.decode(new).strip()


@pytest.mark.parametrize(
    "candidate, reference, expected",
    [
        ("the red cup", "the red cup", 1.0),
        ("the cup", "the red cup", 0.8),  # LCS 2: P = 1, R = 2/3
        ("a b c d", "d c b a", 0.25),  # LCS 1
        ("The Red cup", "the red cup", 1.0),  # case-insensitive
        ("", "the red cup", 0.0),
        ("blue box", "the red cup", 0.0),
    ],
)
def test_rouge_l_on_known_pairs(candidate, reference, expected):
    assert rouge_l_f1(candidate, reference) == pytest.approx(expected)


# --- data and tasks --------------------------------------------------------------------------------------------------


def test_corpus_generation_is_deterministic_even_across_hash_seeds():
    code = "from d2lora_min.train.world import *; import hashlib; w = World(); print(hashlib.sha256(repr((w.facts, corpus_documents(w, 300, 1))).encode()).hexdigest())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": s}).stdout for s in ("1", "2")}
    assert len(outs) == 1 and len(next(iter(outs))) == 65
    w = World()
    assert corpus_documents(w, 50, 1) == corpus_documents(w, 50, 1) != corpus_documents(w, 50, 2)


def test_no_pretraining_document_uses_the_task_format():
    docs = corpus_documents(World(), 3000, seed=1)
    assert not any("Q:" in d or "\nA:" in d for d in docs)


def test_splits_are_disjoint_deterministic_and_large_enough():
    world = World()
    splits = build_splits(world, list(TASKS), n_train=300, n_test=500, n_validation=200, seed=0)
    again = build_splits(world, list(TASKS), n_train=300, n_test=500, n_validation=200, seed=0)
    for name, parts in splits.items():
        assert len(parts.test) == 500 and len(parts.validation) == 200
        distinct = {(it.prompt, tuple(getattr(it, "choices", ()))) for it in parts.test}
        assert len(distinct) >= (300 if name == "update" else 500), name  # (update: 80 questions, other choices)
        prompts = {k: {it.prompt for it in getattr(parts, k)} for k in ("train", "validation", "test")}
        assert not prompts["train"] & prompts["test"] and not prompts["validation"] & (prompts["train"] | prompts["test"]), name
        assert [it.prompt for it in parts.test] == [it.prompt for it in again[name].test]
        assert [it.prompt for it in parts.validation] == [it.prompt for it in again[name].validation]
        for it in parts.test + parts.validation:
            if isinstance(it, MCItem):
                assert 0 <= it.answer < len(it.choices) and len(set(it.choices)) == len(it.choices)
    # facts and continuation are tested (and validated) on people / scripts that training never asks about, and
    # validation and test never share one
    people = {k: {it.cluster for it in getattr(splits["facts"], k)} for k in ("train", "validation", "test")}
    assert all(people.values()) and not people["train"] & (people["validation"] | people["test"])
    assert not people["validation"] & people["test"]

    def causes(items):  # every situation a story mentions, asked about or not
        return {c for it in items for c, _ in SCRIPTS if f" {c}." in it.prompt.split("\nQ:")[0]}

    scripts = {k: causes(getattr(splits["continuation"], k)) for k in ("train", "validation", "test")}
    assert all(scripts.values()) and not scripts["train"] & (scripts["validation"] | scripts["test"])
    assert not scripts["validation"] & scripts["test"]


def test_compare_and_continuation_answers_are_the_ones_the_question_asks_for():
    world, rng = World(), random.Random(0)
    for _ in range(200):
        item = TASKS["compare"].make(rng, world, "test")
        table = item.prompt.split("\n")[0].removeprefix("Points: ").rstrip(".").split(", ")
        points = {name: int(p) for p, name in (entry.split(" ") for entry in table)}
        ranked = sorted(points, key=points.get, reverse=True)  # most first
        rank = {"most": 0, "fewest": -1, "second most": 1, "second fewest": -2}[item.prompt.split("has the ")[1].split(" points")[0]]
        assert item.choices[item.answer] == " " + ranked[rank] and sorted(item.choices) == sorted(" " + n for n in points)
    effect, two_people = dict(SCRIPTS), 0
    for _ in range(200):
        item = TASKS["continuation"].make(rng, world, "test")
        story, question = item.prompt.split("\nQ: What did ")
        asked = question.split(" do next?")[0]
        said = {s.split(" ", 1)[0]: s.split(" ", 1)[1] for s in story.rstrip(".").split(". ")}  # name -> situation
        assert item.choices[item.answer] == " " + effect[said[asked]]
        assert all(" " + effect[c] in item.choices for c in said.values())  # the other person's continuation too
        two_people += len(said) == 2
    assert 50 < two_people < 150


def test_finetune_batches_put_the_loss_on_the_answer_only(tokenizer):
    items = [MCItem("Q: go\nA:", [" yes", " no"], 1), GenItem("Q: red\nA:", "blue green")]
    get_batch = finetune_batches(tokenizer, {"a": items[:1], "b": items[1:]}, batch_size=6, seed=0, pad_id=tokenizer.token_to_id(EOT))
    x, y = get_batch(0)
    assert torch.equal(get_batch(0)[0], x) and x.shape == y.shape and len(x) == 2  # one epoch: both items, once
    texts = sorted(tokenizer.decode([t for t in y[b].tolist() if t != -1]) for b in range(len(x)))
    assert texts == sorted([answer_text(items[0]), answer_text(items[1])])


def test_window_batches_shift_by_one_and_refuse_a_tiny_corpus():
    tokens = np.arange(100, dtype=np.uint16)
    x, y = window_batches(tokens, block_size=8, batch_size=4, seed=0)(3)
    assert torch.equal(x[:, 1:], y[:, :-1])
    with pytest.raises(ValueError, match="too short for one block"):
        window_batches(np.arange(5, dtype=np.uint16), block_size=8, batch_size=4, seed=0)


@pytest.mark.parametrize(
    "content, error, match",
    [
        (None, FileNotFoundError, "does not exist"),
        (b"", ValueError, "at least"),
        (b"\xff\xfe\x00bad", ValueError, "not UTF-8"),
        (b"too short", ValueError, "at least 1000"),
        ("folder", ValueError, "not a regular file"),
    ],
)
def test_bad_user_corpus_is_refused_before_training(tmp_path, content, error, match):
    path = tmp_path / "corpus.txt"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=match):
        read_text_file(str(path))


# --- compare plumbing ------------------------------------------------------------------------------------------------


def test_method_specs_parse_with_types_and_defaults():
    cfg = CompareConfig()
    s = parse_method_spec("d2lora:r=8,project=false,tau_init=0.25", cfg)
    assert (s.name, s.r, s.alpha, s.options) == ("d2lora", 8, 16.0, {"project": False, "tau_init": 0.25})
    assert parse_method_spec("lora", cfg).alpha == cfg.alpha_over_r * cfg.r
    assert parse_method_spec("full", cfg).lr == cfg.full_lr
    assert parse_method_spec("lora:alpha=3,lr=0.001", cfg).alpha == 3.0


@pytest.mark.parametrize(
    "spec, match",
    [
        ("lorra", "unknown method 'lorra'.*valid methods: lora, dora, d2lora, base, full"),
        ("d2lora:projekt=false", "unknown key 'projekt'.*valid keys: r, alpha, dropout, lr, targets, tau_init"),
        ("lora:tau_init=0.1", "unknown key 'tau_init' for method 'lora'"),
        ("d2lora:project", "is not key=value"),
        ("d2lora:project=maybe", "expected true or false"),
        ("d2lora:project=no", "expected true or false"),  # true and false only, as every bool setting
        ("d2lora:learn_tau=on", "expected true or false"),
        ("d2lora:learn_tau=1", "expected true or false"),
        ("lora:", "has a colon but no key=value"),
        ("lora:targets=q_proj++v_proj", "has an empty module name"),
        ("lora:targets=q_proj+", "has an empty module name"),
        ("lora:targets=", "has an empty module name"),
    ],
)
def test_bad_method_specs_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_method_spec(spec, CompareConfig())


def test_one_method_under_two_spellings_is_refused_but_two_lr_roles_are_not(tmp_path):
    tuned = tmp_path / "tuned.json"
    tuned.write_text('{"lrs": {"lora": 0.01, "d2lora": 0.01}}')
    twice = [("lora", "lora:r=4"), ("lora", "lora:alpha=8,dropout=0"), ("lora:lr=0.01", "lora:lr=1e-2,r=4"),
             ("d2lora", "d2lora:tau_init=0.5,project=true,targets=attn"), ("full:lr=1e-3", "full:lr=0.001"),
             ("base", "base")]  # fmt: skip
    for methods in twice:
        cfg = CompareConfig(methods=methods, reference=methods[0], tuned_file=str(tuned), lr_source="tuned")
        with pytest.raises(ValueError, match="a method is listed twice"):
            check_compare_config(cfg)
    # the tuned (or shared) lr and a spec's own are two roles, even at one value: replicate lists both
    for lr_source in ("tuned", "shared"):
        cfg = CompareConfig(methods=("lora", "lora:lr=0.01", "d2lora", "d2lora:lr=0.01"), reference="lora",
                            tuned_file=str(tuned), lr_source=lr_source)  # fmt: skip
        specs = check_compare_config(cfg)
        assert [s.lr for s in specs] == [0.01] * 4 and [s.lr_from for s in specs] == [lr_source, "spec"] * 2


def test_the_help_shows_bool_settings_as_the_parser_takes_them():
    from d2lora_min.train.cli import config_help

    shown = [line.strip() for line in config_help(CompareConfig()) if line.strip().startswith(("--packed=", "--fused="))]
    assert shown == ["--packed=true", "--fused=false"]
    cfg = apply_overrides(CompareConfig(), shown)
    assert (cfg.packed, cfg.fused) == (True, False)
    with pytest.raises(ValueError, match="expected true or false, got 'yes'"):
        apply_overrides(CompareConfig(), ["--packed=yes"])


def test_config_overrides_and_their_errors():
    cfg = apply_overrides(CompareConfig(), ["--train.lr=0.5", "--pretrain.model.n_layer=3", "--seeds=1,2"])
    assert cfg.train.lr == 0.5 and cfg.pretrain.model.n_layer == 3 and cfg.seeds == (1, 2)
    with pytest.raises(ValueError, match="unknown setting 'train.stepz'"):
        apply_overrides(CompareConfig(), ["--train.stepz=3"])
    with pytest.raises(ValueError, match="two dashes"):  # one dash, or none, is not a setting
        apply_overrides(CompareConfig(), ["-n_test=3"])


def test_compare_refuses_a_train_seed_it_would_ignore(capsys):
    with pytest.raises(SystemExit):
        compare_main(["--train.seed=3"])
    assert "comes from --seeds" in capsys.readouterr().err


def test_the_epoch_budget_gives_the_steps_it_claims_and_visits_every_item_once_per_epoch(tokenizer):
    items = [MCItem(f"Q: go{i}\nA:", [" yes", " no"], i % 2) for i in range(10)]
    get_batch = finetune_batches(tokenizer, {"a": items[:7], "b": items[7:]}, batch_size=4, seed=3, pad_id=tokenizer.token_to_id(EOT))
    assert steps_for(10, epochs=2, batch_size=4) == 6  # ceil(10 / 4) = 3 batches per epoch
    for epoch in range(2):
        seen = []
        for step in range(3 * epoch, 3 * epoch + 3):
            x, y = get_batch(step)
            seen += [tokenizer.decode(x[b][x[b] != tokenizer.token_to_id(EOT)].tolist()).split("\n")[0] for b in range(len(x))]
        assert sorted(seen) == sorted(f"Q: go{i}" for i in range(10))  # each item exactly once per epoch
    assert torch.equal(get_batch(4)[0], get_batch(4)[0])  # a pure function of the step


def test_compare_steps_follow_the_budget():
    from d2lora_min.train.presets import budget_train_config

    cfg = CompareConfig(n_train=100, epochs=2, tasks=("yesno", "who", "facts"))
    tcfg = budget_train_config(cfg)
    assert tcfg.steps == 2 * math.ceil(3 * 100 / cfg.train.batch_size)
    assert tcfg.warmup_steps == round(cfg.warmup_frac * tcfg.steps) and tcfg.checkpoint_every < tcfg.steps


def test_the_update_task_never_shows_a_test_wording_in_training_and_the_base_answer_is_a_choice():
    world = World()
    updates = updated_facts(world)
    parts = build_splits(world, ["update"], n_train=400, n_test=300, n_validation=200, seed=0)["update"]
    wording = lambda it, n: it.prompt.replace(n, "{n}")  # noqa: E731
    words = {k: {wording(it, it.cluster) for it in getattr(parts, k)} for k in ("train", "validation", "test")}
    assert all(words.values()) and not words["train"] & words["test"]
    assert not words["validation"] & (words["train"] | words["test"])
    from d2lora_min.train.tasks import UPDATE_QUESTIONS  # no split's question is another split's with words around it

    for a, b in ((a, b) for a in UPDATE_QUESTIONS for b in UPDATE_QUESTIONS if a != b):
        for attr in ("city", "job"):
            assert not any(q in p for q in UPDATE_QUESTIONS[a][attr] for p in UPDATE_QUESTIONS[b][attr]), (a, b, attr)
    for it in parts.test + parts.validation:
        attr, old, new = updates[it.cluster]
        assert it.choices[it.answer] == " " + new and " " + old in it.choices and old != new
    # the updated people are kept out of the facts task, whose answers are the pretrained facts
    facts = build_splits(world, ["facts"], 300, 300, n_validation=100, seed=0)["facts"]
    assert not {it.cluster for it in facts.train + facts.validation + facts.test} & set(updates)


def test_retention_is_measured_on_what_fine_tuning_never_sees():
    world = World()
    probe = retention_probe(world)
    splits = build_splits(world, list(TASKS), n_train=300, n_test=50, seed=0)
    asked = {it.cluster for t in ("facts", "update") for it in splits[t].train}  # people whose facts training asks about
    assert not {it.cluster for it in probe} & asked  # the probe's facts are never asked or taught in fine-tuning
    assert not any("Q:" in it.prompt for it in probe)  # corpus wording, not the task format
    tok = train_tokenizer(corpus_documents(world, 300, 1), 300)
    tokens = heldout_text(world, tok, n_docs=50, exclude_names=tuple(updated_facts(world)))
    assert len(tokens) > 100
