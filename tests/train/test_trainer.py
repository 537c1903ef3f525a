"""The shared trainer (trainer.py): it lowers the loss, trains only the adapters, resumes an interrupted run to the same
result, stops at a non-finite loss, follows its schedule, and refuses what it cannot train on before the first step.
The checkpoint file's own checks: tests/files/test_checkpoints.py."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from d2lora_min.files.checkpoints import CHECKPOINT, read_checkpoint_state
from d2lora_min.nn import adapter_state_dict, inject_adapters
from d2lora_min.train.trainer import TrainConfig, TrainingDiverged, lr_at, train
from tiny_gpt import GPT, GPTConfig

from .. import helpers

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
    assert (
        any("lora_A" in n for n in moved)
        and any("lora_B" in n for n in moved)
        and any(n.endswith("tau") for n in moved)
    )
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


# --- a run resumes from its own checkpoint; what the trainer cannot train on is refused before the first step -----
# (on helpers.narrow_gpt and its counting task)


class WithAnUnusedParameter(nn.Module):
    """A model with a trainable tensor that no loss reaches: AdamW makes no state for it."""

    def __init__(self):
        super().__init__()
        self.gpt, self.unused = helpers.narrow_gpt(), nn.Linear(2, 2)

    def forward(self, x, y):
        return self.gpt(x, y)


@pytest.mark.parametrize(
    "make, cfg",
    [(lambda: inject_adapters(helpers.narrow_gpt(), "d2lora", r=2, alpha=4, learn_tau=True), {"weight_decay": 0.1}),
     (lambda: inject_adapters(helpers.narrow_gpt(), "dora", r=2, alpha=4), {"weight_decay": 0.1}),
     (lambda: helpers.narrow_gpt().requires_grad_(True), {}),
     (WithAnUnusedParameter, {})],
    ids=["d2lora-learned-tau-decay", "dora-decay", "full", "unused-parameter"],
)  # fmt: skip
def test_a_run_resumes_from_its_own_checkpoint_whatever_its_optimizer_state_holds(tmp_path, make, cfg):
    def stop_after_2(done, model, result):  # the callback runs before step 2's checkpoint: step 1's is the last
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(
            make(),
            helpers.counting,
            helpers.quiet(steps=4, checkpoint_every=1, **cfg),
            out_dir=tmp_path,
            callback=stop_after_2,
        )
    resumed = train(make(), helpers.counting, helpers.quiet(steps=4, checkpoint_every=1, **cfg), out_dir=tmp_path)
    assert resumed.resumed_from == 1 and len(resumed.losses) == 4


def test_a_file_where_the_checkpoint_folder_should_be_fails_before_training(tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("not a folder")
    steps = []
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        train(inject_adapters(helpers.narrow_gpt(), "lora", r=2, alpha=4), helpers.counting, helpers.quiet(steps=3), out_dir=blocker,
              callback=lambda done, model, result: steps.append(done))  # fmt: skip
    assert steps == []


def test_a_batch_without_target_tokens_is_a_clear_error_not_a_divergence():
    def no_targets(step):
        x, y = helpers.counting(step)
        return x, torch.full_like(y, -1)

    with pytest.raises(ValueError, match="no target tokens"):
        train(inject_adapters(helpers.narrow_gpt(), "lora", r=2, alpha=4), no_targets, helpers.quiet(steps=2))
