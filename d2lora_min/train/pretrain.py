"""Pretraining the base model, and loading it.

    d2lora pretrain                                # the default base, into runs/pretrain/<key>/
    d2lora pretrain --out base --replace_shipped   # replace the shipped base, on purpose

The default base ships in the repository (base/: the weights, the tokenizer, and base.json with the configs, the
SHA-256 of each file and of the whole, the validation loss and the look-up probe's score); `make compare` starts from
it. A changed model or corpus config pretrains a new base instead, cached under runs/bases/<hash of the configs>/.
"""

import argparse
import copy
import functools
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from tiny_gpt import GPT, GPTConfig

from ..files import io
from ..files.io import (
    LOCK_FILE,
    REBUILD_HINT,
    atomic_path,
    check_paths,
    check_writable,
    output_lock,
    read_json,
    write_json,
)
from ..synthetic.world import World, corpus_documents, lookup_probe, skill_probes
from .cli import UsageError, apply_overrides, check_range, config_help, run_cli
from .data import VOCAB_SIZE, CorpusConfig, build_corpus, load_tokenizer, window_batches
from .evaluate import mc_accuracy, validation_loss
from .tasks import MCItem
from .trainer import TrainConfig, check_train_config, init_distributed, pick_device, rank_and_world, train

SHIPPED_BASE = io.repo_root() / "base"
PROBE_ITEMS, PROBE_SEED = 300, 12345


def default_train_config():
    settings = dict(steps=8000, batch_size=32, lr=3e-3, min_lr_ratio=0.1, warmup_steps=200, weight_decay=0.1)
    return TrainConfig(**settings, checkpoint_every=250, desc="pretrain")


@dataclass
class PretrainConfig:
    model: GPTConfig = field(
        default_factory=lambda: GPTConfig(VOCAB_SIZE, block_size=128, n_layer=2, n_head=4, d_model=128)
    )
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    train: TrainConfig = field(default_factory=default_train_config)

    def key(self):
        """A short hash of everything that changes the resulting weights: the configs (not progress bars or
        checkpoint intervals) and a fingerprint of the corpus text itself, so that an edited synthetic/world.py counts too."""
        not_the_weights = ("progress", "desc", "checkpoint_every", "device", "amp")
        t = {k: v for k, v in asdict(self.train).items() if k not in not_the_weights}
        blob = {
            "model": asdict(self.model),
            "corpus": asdict(self.corpus),
            "train": t,
            "text": corpus_fingerprint(self.corpus),
        }
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


# Each setting's range, in the order they are checked (vocab_size: the 256 bytes and the end-of-text token at least).
PRETRAIN_RANGES = {"model.n_layer": (1, 64), "model.n_head": (1, 1024), "model.d_model": (1, 16384),
                   "model.block_size": (8, 65536), "model.vocab_size": (1, None), "model.dropout": (0.0, 0.99),
                   "corpus.n_people": (20, 100_000), "corpus.n_docs": (1, 100_000_000), "corpus.n_val_docs": (1, 10_000_000),
                   "corpus.vocab_size": (257, 1_000_000), "corpus.world_seed": (0, 2**32 - 1), "corpus.seed": (0, 2**32 - 1)}  # fmt: skip


def check_pretrain_config(cfg: PretrainConfig, prefix=""):
    """Every pretraining setting in range, before any work (a corpus takes a minute to build); a UsageError naming
    the first one that is not."""
    p, m, c = f"{prefix}." if prefix else "", cfg.model, cfg.corpus
    for name, (low, high) in PRETRAIN_RANGES.items():
        section, field_name = name.split(".")
        check_range(
            p + name, getattr(getattr(cfg, section), field_name), low, high, kind=float if high == 0.99 else int
        )
        if name == "model.d_model" and m.d_model % m.n_head:
            raise UsageError(f"{p}model.n_head={m.n_head} must divide {p}model.d_model={m.d_model}")
    if c.text_file is not None and not os.path.isfile(c.text_file):
        what = "is not a regular file (a folder or a device)" if os.path.exists(c.text_file) else "does not exist"
        raise UsageError(f"{p}corpus.text_file {c.text_file!r} {what}")
    check_train_config(cfg.train, f"{p}train")
    return cfg


def corpus_fingerprint(corpus_cfg, n_docs=500):
    """SHA-256 of the user's text file, or of the world's facts and the first n_docs synthetic documents (computed once
    per process for each corpus config)."""
    return _fingerprint(json.dumps(asdict(corpus_cfg), sort_keys=True), n_docs)


@functools.lru_cache(maxsize=8)
def _fingerprint(corpus_json, n_docs):
    corpus_cfg = CorpusConfig(**json.loads(corpus_json))
    if corpus_cfg.text_file:
        return io.sha256_file(corpus_cfg.text_file)
    world = World(seed=corpus_cfg.world_seed, n_people=corpus_cfg.n_people)
    docs = corpus_documents(world, n_docs, seed=corpus_cfg.seed)
    return hashlib.sha256(json.dumps([world.facts, docs], sort_keys=True).encode()).hexdigest()


def probe_items(corpus_cfg):
    """{name: MCItems}: the held-out look-up probe ("probe", the score recorded with the base) and the
    diagnostic skill probes (synthetic world only)."""
    world = World(seed=corpus_cfg.world_seed, n_people=corpus_cfg.n_people)
    probes = {"probe": lookup_probe(world, PROBE_ITEMS, PROBE_SEED), **skill_probes(world, PROBE_ITEMS, PROBE_SEED + 1)}
    return {name: [MCItem(p, c, a) for p, c, a in items] for name, items in probes.items()}


def save_base(folder, model, tokenizer, meta):
    """Write the base atomically: weights, tokenizer, then base.json (written last: its presence marks a complete
    base, and it records the SHA-256 of the others)."""
    folder = Path(folder)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_model(model, tmp)
    with atomic_path(folder / "tokenizer.json") as tmp:
        tokenizer.save(tmp)
    files, sha = io.base_fingerprint(folder, meta)
    meta = {**meta, "files": files, "sha256": sha}
    write_json(folder / "base.json", meta)
    return meta


def load_base(folder=SHIPPED_BASE, device="cpu", check_hash=True):
    """(model, tokenizer, meta) from a base folder; refuses a missing file or one whose SHA-256 differs from
    what base.json records (weights, tokenizer and model config are all covered)."""
    folder = Path(folder)
    if not (folder / "base.json").is_file():
        raise FileNotFoundError(f"no base model in {folder} (base.json missing); {REBUILD_HINT}")
    try:
        meta = read_json(folder / "base.json")
        model_config = GPTConfig(**meta["config"]["model"])
        if not isinstance(meta.get("files"), dict) or not isinstance(meta.get("sha256"), str):
            raise TypeError('"files" must map file names to SHA-256 digests and "sha256" must be a string')
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # read_json's errors are ValueErrors
        raise ValueError(f"{folder}/base.json is unreadable ({type(e).__name__}: {e}); {REBUILD_HINT}") from None
    if check_hash:
        io.check_base_files(folder, meta)  # weights, tokenizer and model config, against their recorded SHA-256
    model = GPT(model_config)
    try:
        load_model(model, folder / "model.safetensors", device=str(device))
    except RuntimeError as e:  # torch lists every mismatch over many lines: one line of it, with the file's name
        raise ValueError(
            f"{folder}/model.safetensors does not fit the model config in base.json: "
            f"{' '.join(str(e).split())[:400]}; {REBUILD_HINT}"
        ) from None
    model.to(device).eval()
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    if tokenizer.get_vocab_size() != model_config.vocab_size:
        raise ValueError(
            f"{folder}: tokenizer has {tokenizer.get_vocab_size()} tokens, the model {model_config.vocab_size}"
        )
    return model, tokenizer, meta


def evaluate_base(model, tokenizer, val_tokens, probes):
    """{"val_loss": held-out loss, <probe>: accuracy for each probe} (leaves the model in train mode)."""
    model.eval()
    row = {"val_loss": validation_loss(model, val_tokens, model.config.block_size)}
    row.update({name: mc_accuracy(model, tokenizer, items)[0] for name, items in probes.items()})
    model.train()
    return row


def pretrain(cfg: PretrainConfig, out_dir, eval_every=500):
    """Pretrain from scratch (resuming from out_dir/work if a checkpoint is there) and save the base in out_dir."""
    t_start = time.time()
    key = cfg.key()  # before the vocabulary size is set from the tokenizer
    out_dir = Path(out_dir)
    check_writable(out_dir)
    outputs = ("model.safetensors", "tokenizer.json", "base.json", LOCK_FILE)
    check_paths(out_dir, files=[out_dir / name for name in outputs], folders=[out_dir / "work" / key])
    with output_lock(out_dir, hold=rank_and_world()[0] == 0):  # one pretraining at a time into a folder
        return _pretrain(cfg, out_dir, eval_every, key, t_start)


def _pretrain(cfg, out_dir, eval_every, key, t_start):
    """pretrain() once its outputs are checked and its folder is locked."""
    cfg = copy.deepcopy(cfg)
    tokenizer, train_tokens, val_tokens = build_corpus(cfg.corpus)
    cfg.model.vocab_size = tokenizer.get_vocab_size()
    print(
        f"corpus: {len(train_tokens):,} training tokens, {len(val_tokens):,} validation tokens, "
        f"vocabulary {cfg.model.vocab_size}",
        flush=True,
    )
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    print(f"model: {model.num_params():,} parameters, {cfg.model}", flush=True)
    probes = probe_items(cfg.corpus) if not cfg.corpus.text_file else {}
    get_batch = window_batches(train_tokens, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed)
    tokens_per_step = cfg.train.batch_size * cfg.model.block_size
    log = []
    rank, _ = rank_and_world()

    def evaluate(step):
        return {"step": step, "tokens": step * tokens_per_step, **evaluate_base(model, tokenizer, val_tokens, probes)}

    def callback(step, model, result):
        if rank == 0 and (step % eval_every == 0 or step == cfg.train.steps):
            log.append(evaluate(step))
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in log[-1].items()))

    # the work folder is keyed by the settings, so a rerun with other settings never resumes this one's checkpoint
    result = train(model, get_batch, cfg.train, out_dir=os.path.join(out_dir, "work", key), callback=callback, key=key)
    if rank != 0:  # under torchrun only rank 0 evaluates and writes
        dist.barrier()
        return None
    final = log[-1] if log and log[-1]["step"] == cfg.train.steps else evaluate(cfg.train.steps)
    meta = {
        "config": {"model": asdict(cfg.model), "corpus": asdict(cfg.corpus), "train": asdict(cfg.train)},
        "key": key,
    }
    meta.update(val_loss=final["val_loss"], probe_accuracy=final.get("probe"), probe_items=PROBE_ITEMS if probes else 0)
    meta.update(
        skill_probes={k: final[k] for k in probes if k != "probe"}, tokens_seen=cfg.train.steps * tokens_per_step
    )
    meta.update(train_seconds_this_run=round(time.time() - t_start, 1), resumed_from_step=result.resumed_from, log=log)
    meta.update(torch=torch.__version__, threads=torch.get_num_threads())
    model.cpu()
    meta = save_base(out_dir, model, tokenizer, meta)
    if dist.is_initialized():
        dist.barrier()
    return meta


BASE_CACHE = Path("runs") / "bases"


def resolve_base(cfg: PretrainConfig):
    """(model, tokenizer, meta, folder) for `cfg`: the shipped base when cfg is the config it was pretrained
    with, else a cached base for cfg's key, else a new one pretrained now (and cached). The default settings
    never pretrain silently: a missing or damaged shipped base is an error that says how to restore it."""
    key = cfg.key()
    if key == PretrainConfig().key():  # the default settings: the shipped base, or an error
        return (*load_base(SHIPPED_BASE), SHIPPED_BASE)
    cached = BASE_CACHE / key
    if (cached / "base.json").exists():
        return (*load_base(cached), cached)
    print(f"the model or corpus settings differ from the shipped base's: pretraining a new base into {cached} (this "
          f"takes a while; it is cached for later runs)", flush=True)  # fmt: skip
    pretrain(cfg, cached)
    return (*load_base(cached), cached)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="d2lora pretrain",
        description="Pretrain a base model (default settings: the shipped one) into a run folder.",
        epilog="settings (override with --section.field=value):\n" + "\n".join(config_help(PretrainConfig())),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default=None, help="folder for the base (default: runs/pretrain/<settings key>)")
    parser.add_argument("--replace_shipped", action="store_true", help="allow --out to be the shipped base/ folder")
    parser.add_argument("--eval_every", type=int, default=500, help="steps between probe/validation evaluations")
    args, overrides = parser.parse_known_args(argv)

    def body():
        cfg = check_pretrain_config(apply_overrides(PretrainConfig(), overrides))
        check_range("--eval_every", args.eval_every, 1)
        out = Path(args.out) if args.out else Path("runs") / "pretrain" / cfg.key()
        if out.resolve() == SHIPPED_BASE.resolve() and not args.replace_shipped:
            raise UsageError(f"--out {out} is the shipped base: add --replace_shipped to overwrite it on purpose")
        if str(args.out) == "":
            raise UsageError("--out is empty")
        rank, _ = init_distributed()  # under torchrun: join the process group; otherwise a no-op
        cfg.train.device = pick_device(cfg.train.device)
        if cfg.train.device == "cpu":
            print(f"pretraining on CPU with {torch.get_num_threads()} threads into {out}", flush=True)
        meta = pretrain(cfg, out, eval_every=args.eval_every)
        shown = ("val_loss", "probe_accuracy", "tokens_seen", "train_seconds_this_run", "sha256")
        if rank == 0:
            print(json.dumps({k: meta[k] for k in shown}, indent=2))
        return 0

    return run_cli(parser, body)


if __name__ == "__main__":
    sys.exit(main())
