"""``gpt2lab demo``: the whole pipeline offline in a few minutes on a CPU.

Prepare the offline corpus (the Python standard library's sources), recode it in a compact vocabulary
(256 bytes plus the most frequent GPT-2 tokens, lossless: a small model then spends its compute on the
transformer, not on a 50,257-row output layer), train a small GPT-2 with rotary positions on it,
sample Python from the checkpoint and print the next commands, runnable as printed. Running it again
resumes (or reuses) what is already there.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from gpt2lab import distributed, files, settings
from gpt2lab.data import META, Batches, Source, TokenData, compact_vocabulary, prepare, read_meta
from gpt2lab.generation import generate
from gpt2lab.load import load_model, tokenizer_of
from gpt2lab.model import GPT
from gpt2lab.train import configure_optimizer, train, train_step
from gpt2lab.train_config import DataSection, ModelSection, OptimSection, RunSection, TrainConfig

PROMPT = "import os\n\n\ndef"
VOCAB = 1024


def demo_config(data_dir: Path, run_dir: Path) -> TrainConfig:
    """The demo's training: a small GPT-2 with rotary positions that trains in about three minutes on two
    CPU cores. Narrow and rotary because, for this budget, that reaches the lowest validation loss: a
    narrow model takes more steps, and learned positions are the slowest part of a small model to train."""
    return TrainConfig(
        model=ModelSection(n_layer=4, n_head=4, n_embd=64, block_size=256, vocab_size=VOCAB, pos_emb="rope"),
        data=DataSection(dir=str(data_dir), batch_size=16, block_size=256),
        optim=OptimSection(lr=3e-3, min_lr=3e-4, warmup_steps=20),
        run=RunSection(steps=1000, eval_every=250, eval_batches=8, ckpt_every=250, log_every=20, out_dir=str(run_dir)),
    )


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None, max_new_tokens: int = 120) -> None:
    out = Path(out)
    data_dir = ensure_data(out / "data")
    cfg = TrainConfig.load(None, overrides or [], defaults=demo_config(data_dir, out / "run"))
    config_file = out / "demo.toml"
    files.write_text(config_file, settings.to_toml(cfg.to_dict()))
    print(f"[2/3] training a small GPT-2 -> {cfg.run.out_dir} (settings: {config_file}; Ctrl-C stops, rerun resumes)")
    print(f"      {_plan(cfg)}")
    result = train(cfg)
    print(f"[3/3] sampling from {cfg.run.out_dir} (temperature 0.7, top-k 40)")
    model, tok = load_model(cfg.run.out_dir).eval(), tokenizer_of(cfg.run.out_dir)
    [new] = generate(
        model, [tok.encode(PROMPT)], max_new_tokens, temperature=0.7, top_k=40, seed=0, eos_id=tok.eot_token
    )
    print("-" * 60 + "\n" + PROMPT + tok.decode(new) + "\n" + "-" * 60)
    if result.val_loss is not None:
        bpb = f" = {result.val_bpb:.3f} bits per byte of text" if result.val_bpb is not None else ""
        print(f"val loss {result.val_loss:.3f} nats per token{bpb}; checkpoint {result.checkpoint}")
    _next_steps(cfg, out, config_file)


def ensure_data(directory: Path) -> Path:
    """The stdlib corpus in GPT-2 tokens (``directory/stdlib``) and in the demo's compact vocabulary
    (``directory/stdlib-v1024``), prepared once and reused."""
    gpt2, compact = directory / "stdlib", directory / f"stdlib-v{VOCAB}"
    print(f"[1/3] corpus: the Python standard library's sources -> {compact}")
    if not (gpt2 / META).is_file():
        print("      " + str(prepare(gpt2, Source(corpus="stdlib"), val_fraction=0.02)))
    key = {"compact_of": str(gpt2.resolve()), "vocab": VOCAB}
    if not (compact / META).is_file() or read_meta(compact).get("compact") != key:
        coverage = compact_vocabulary(gpt2, compact, VOCAB, key)
        share = 100 * coverage["train_spelled_fraction"]
        print(f"      {VOCAB}-token vocabulary: the other {share:.1f}% of GPT-2 tokens are spelled as bytes")
    else:
        print("      already prepared; reusing it")
    return compact


def _plan(cfg: TrainConfig) -> str:
    """Parameters, tokens and the time the run should take here, from two timed training steps."""
    config = cfg.model.build()
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = configure_optimizer(model, cfg.optim)
    batches = Batches(TokenData(cfg.data.dir, "train"), cfg.data.batch_size, cfg.data.block_size)
    env, amp = distributed.init("single", "cpu"), torch.autocast("cpu", enabled=False)
    train_step(model, optimizer, batches, 0, amp, 1.0, env)
    started = time.perf_counter()
    for step in (1, 2):
        train_step(model, optimizer, batches, step, amp, 1.0, env)
    per_step = (time.perf_counter() - started) / 2
    evals = cfg.run.steps // cfg.run.eval_every if cfg.run.eval_every else 0
    seconds = per_step * (cfg.run.steps + evals * cfg.run.eval_batches / 3)  # an eval batch: a forward only
    tokens = cfg.run.steps * cfg.data.batch_size * cfg.data.block_size
    return (
        f"{model.num_params():,} parameters, {cfg.run.steps} steps of {cfg.data.batch_size} x {cfg.data.block_size} "
        f"tokens ({tokens / 1e6:.1f} M tokens): about {seconds / 60:.1f} min on this machine"
    )


def _next_steps(cfg: TrainConfig, out: Path, config_file: Path) -> None:
    run_dir, data_dir, program = cfg.run.out_dir, cfg.data.dir, _program()
    print("next (each runs as printed):")
    print(f"  {program} generate --model {run_dir} --prompt 'class Stack:' --max-new-tokens 200   # seconds")
    print(f"  {program} predict --model {run_dir} 'for i in range('                              # seconds")
    print(
        f"  {program} eval --model {run_dir} --data {data_dir} --block-size {cfg.data.block_size}"
        "   # the val split at the training context, under a minute"
    )
    print(f"  {program} export --model {run_dir} --out {out / 'hf'}                       # HF-format directory")
    print(
        f"  {program} train --config {config_file} --model.pos_emb=learned --run.out_dir={out / 'learned'}"
        "   # the same run with GPT-2's learned positions: as long as the demo"
    )
    print(f"  {program} compare --help                                     # every variant, same data, a report")


def _program() -> str:
    """How to call gpt2lab from here: its name when the shell finds this very program, else its path
    (the demo usually runs from a virtual environment that is not activated)."""
    here = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    found = shutil.which("gpt2lab")
    if here is not None and here.name == "gpt2lab":
        if found and Path(found).resolve() == here:
            return "gpt2lab"
        try:
            return str(Path(sys.argv[0]).resolve().relative_to(Path.cwd()))
        except ValueError:
            return str(here)
    return "gpt2lab" if found else f"{sys.executable} -m gpt2lab"
