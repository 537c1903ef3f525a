"""The code a learner edits is the code that runs: change a piece of a method's plain math (in dora.py or
d2lora.py) and a tiny `make compare` run trains and scores differently. With the fused path as the default, these
edits would change nothing (fused.py computes the same math on its own)."""

import json

import torch

from d2lora_min.nn import d2lora, dora
from d2lora_min.train import compare as compare_mod
from d2lora_min.train.compare import main as compare_main
from d2lora_min.train.data import heldout_text
from d2lora_min.train.tasks import retention_probe

TINY = ["--seeds=0", "--tasks=who", "--n_train=8", "--epochs=1", "--n_test=8", "--train.batch_size=4",
        "--checkpoints=1", "--train.progress=false", "--reference=lora"]  # fmt: skip


def _tiny_runs(out, methods, monkeypatch):
    monkeypatch.setattr(compare_mod, "retention_probe", lambda world: retention_probe(world, n_items=20))
    monkeypatch.setattr(compare_mod, "heldout_text", lambda world, tok, **kw: heldout_text(world, tok, n_docs=20, **kw))
    assert compare_main(TINY + ["--methods", "lora " + methods, "--out", str(out)]) == 0
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    return {r["method"]: r for r in runs}


def _differ(a, b):
    """Whether two runs of one method trained (losses) and scored (every choice's log-likelihood) differently."""
    return a["losses"] != b["losses"] and a["items"]["who"]["logp"] != b["items"]["who"]["logp"]


def test_editing_a_methods_plain_math_changes_what_compare_trains_and_scores(tmp_path, monkeypatch):
    clean = _tiny_runs(tmp_path / "clean", "dora d2lora", monkeypatch)

    # a learner's edits: DoRA's per-row factor halved (a helper its forward() calls), D2-LoRA without its negative
    # branch (its stacked_factors())
    def half_factor(target, V, detach_norm):
        return 0.5 * target.to(V.dtype) / V.norm(dim=1).clamp_min(1e-12)

    def positive_branch_only(self):
        A = torch.cat([self.lora_A_pos, self.lora_A_neg], dim=0)  # (2r, in)
        B = torch.cat([self.lora_B_pos, 0.0 * self.lora_B_neg], dim=1)  # (out, 2r)
        return A, B

    monkeypatch.setattr(dora, "row_factor", half_factor)
    monkeypatch.setattr(d2lora.D2LoRALinear, "stacked_factors", positive_branch_only)
    edited = _tiny_runs(tmp_path / "edited", "dora d2lora", monkeypatch)

    assert clean["lora"]["losses"] == edited["lora"]["losses"]  # the edits touch DoRA and D2-LoRA only
    assert _differ(clean["dora"], edited["dora"])
    assert _differ(clean["d2lora"], edited["d2lora"])


def test_a_new_layer_runs_the_plain_forward_of_its_method_file(monkeypatch):
    # the library's default, outside compare: a freshly wrapped layer computes what its file's forward() says
    from .helpers import perturb_adapters

    torch.manual_seed(0)
    x = torch.randn(3, 6)
    layers = [dora.DoRALinear(torch.nn.Linear(6, 4), r=2, alpha=4.0), d2lora.D2LoRALinear(torch.nn.Linear(6, 4), r=2, alpha=4.0)]
    for layer in layers:
        perturb_adapters(layer, 0)
    before = [layer(x) for layer in layers]
    monkeypatch.setattr(dora, "row_factor", lambda target, V, detach: 0.5 * target / V.norm(dim=1))
    monkeypatch.setattr(d2lora, "row_factor", lambda target, V, detach: 0.5 * target / V.norm(dim=1))
    after = [layer(x) for layer in layers]
    assert all(not torch.allclose(a, b) for a, b in zip(before, after))


def test_the_fused_setting_runs_the_fused_path_as_runs_of_their_own(tmp_path, monkeypatch):
    from d2lora_min.nn import fused

    calls = []
    original = fused.FusedDoRALinear.forward
    monkeypatch.setattr(fused.FusedDoRALinear, "forward", lambda layer, x: calls.append(1) or original(layer, x))
    plain = _tiny_runs(tmp_path / "out", "dora", monkeypatch)
    assert not calls  # the default: DoRALinear.forward's plain math
    assert compare_main(TINY + ["--methods", "lora dora", "--out", str(tmp_path / "out"), "--fused=true"]) == 0
    assert calls
    runs = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("dora*.json")]
    assert len(runs) == 2  # the fused run did not reuse the plain one: the setting is part of the run key
    fused_run = next(r for r in runs if r["key"] != plain["dora"]["key"])
    assert max(abs(a - b) for a, b in zip(fused_run["losses"], plain["dora"]["losses"])) < 1e-3  # same math, other rounding
