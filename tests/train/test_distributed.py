"""Data-parallel training with torch.distributed (gloo, 2 CPU processes), and runs that survive SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from d2lora_min.files.checkpoints import read_checkpoint_state

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)


def torchrun(n, *args, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *map(str, args)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_two_processes_match_one_and_only_rank0_writes(tmp_path):
    dumps = {}
    for n in (1, 2):
        (tmp_path / f"out{n}").mkdir()
        torchrun(n, "tests/train/ddp_worker.py", tmp_path / f"out{n}", tmp_path)
        dumps[n] = [torch.load(tmp_path / f"rank{r}_of{n}.pt", weights_only=True) for r in range(n)]
    single, (rank0, rank1) = dumps[1][0], dumps[2]
    assert rank0["world"] == rank1["world"] == 2
    for k, t in single["adapter"].items():
        assert torch.equal(rank0["adapter"][k], rank1["adapter"][k]), k  # every rank ends identical
        torch.testing.assert_close(rank0["adapter"][k], t, rtol=1e-5, atol=1e-6)  # 2 processes = 1 process
    torch.testing.assert_close(torch.tensor(rank0["losses"]), torch.tensor(single["losses"]), rtol=1e-5, atol=1e-6)
    assert rank0["writes"] == 2 and rank1["writes"] == 0  # checkpoints at steps 4 and 8, by rank 0 only
    assert sorted(p.name for p in (tmp_path / "out2").iterdir()) == ["checkpoint.pt"]


COMPARE = [
    "-m", "d2lora_min.train.compare", "--methods", "d2lora", "--seeds=0", "--tasks=who,compare", "--n_train=80",
    "--epochs=2", "--n_test=40", "--train.batch_size=8", "--checkpoints=8", "--train.progress=false",
]  # fmt: skip


def run_json(out):
    """The finished d2lora seed-0 run's result (its file name carries a hash of the method spec)."""
    (path,) = (out / "runs").glob("d2lora-*_seed0_*.json")
    return json.loads(path.read_text())


def adapter_of(out):
    return load_file(out / run_json(out)["adapter"] / "adapter.safetensors")


def test_compare_under_torchrun_matches_a_single_process(tmp_path):
    torchrun(2, *COMPARE, "--out", tmp_path / "two")
    subprocess.run(
        [sys.executable, *COMPARE, "--out", str(tmp_path / "one")], cwd=ROOT, check=True, capture_output=True
    )
    two, one = adapter_of(tmp_path / "two"), adapter_of(tmp_path / "one")
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)
    assert run_json(tmp_path / "two")["processes"] == 2


def every_file_loads(folder):
    """Open every finished file under folder (atomic writes leave only hidden temporaries half-written)."""
    for p in folder.rglob("*"):
        if p.is_dir() or p.name.startswith("."):
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".pt":
            read_checkpoint_state(p)
        elif p.suffix == ".safetensors":
            load_file(p)


def test_a_killed_compare_run_resumes_to_the_uninterrupted_result(tmp_path):
    cmd = [sys.executable, *COMPARE, "--epochs=8", "--checkpoints=30"]  # 160 steps: long enough to be killed partway
    subprocess.run(cmd + ["--out", str(tmp_path / "clean")], cwd=ROOT, check=True, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + ["--out", str(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, ckpt = time.time() + 120, None
    while time.time() < deadline:  # wait for a checkpoint beyond the first, checking every file as we go
        found = list(out.glob("work/d2lora-*_seed0_*/checkpoint.pt"))
        if found and read_checkpoint_state(found[0])["step"] >= 10:
            ckpt = found[0]
            break
        every_file_loads(out)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt is not None, "no checkpoint appeared"
    killed_at = read_checkpoint_state(ckpt)["step"]
    assert 10 <= killed_at < 160, "the run was not killed partway through training"
    every_file_loads(out)

    subprocess.run(cmd + ["--out", str(out)], cwd=ROOT, check=True, capture_output=True)
    every_file_loads(out)
    resumed, clean = run_json(out), run_json(tmp_path / "clean")
    assert resumed["resumed_from_step"] >= killed_at
    assert resumed["losses"][-1] == clean["losses"][-1] and resumed["losses"] == clean["losses"]
    a, b = adapter_of(out), adapter_of(tmp_path / "clean")
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert resumed["scores"] == clean["scores"]
    assert not ckpt.parent.exists()  # the finished run's checkpoint folder is cleaned up
