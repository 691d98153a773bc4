"""``gpt2lab demo``: the whole pipeline offline in a few minutes on a CPU.

Prepare the offline corpus (the Python standard library's sources), train a small GPT-2 on it with a
progress bar, sample from the checkpoint, and, when real GPT-2 weights are in the local Hugging Face
cache, sample from those too. Running it again resumes (or reuses) what is already there.
"""

from __future__ import annotations

from pathlib import Path

from gpt2lab.data import Source, prepare
from gpt2lab.errors import GPT2LabError
from gpt2lab.generation import generate
from gpt2lab.load import load_model
from gpt2lab.tokenizer import load_tokenizer
from gpt2lab.train import train
from gpt2lab.train_config import DataSection, ModelSection, OptimSection, RunSection, TrainConfig

PROMPT = "def main("


def demo_config(data_dir: Path, run_dir: Path) -> TrainConfig:
    """The demo's training: a small GPT-2 that trains in minutes on a laptop CPU."""
    return TrainConfig(
        model=ModelSection(preset="gpt2", n_layer=4, n_head=4, n_embd=192, block_size=128),
        data=DataSection(dir=str(data_dir), batch_size=8, block_size=128),
        optim=OptimSection(lr=2e-3, min_lr=2e-4, warmup_steps=30),
        run=RunSection(steps=300, eval_every=100, eval_batches=4, ckpt_every=100, log_every=10, out_dir=str(run_dir)),
    )


def run_demo(out: str | Path = "runs/demo", overrides: list[str] | None = None, max_new_tokens: int = 60) -> None:
    out = Path(out)
    data_dir, run_dir = out / "data", out / "run"
    print(f"[1/3] corpus: the Python standard library's sources -> {data_dir}")
    if (data_dir / "meta.json").is_file():
        print("      already prepared; reusing it")
    else:
        print(prepare(data_dir, Source(corpus="stdlib"), val_fraction=0.02))

    print(f"[2/3] training a small GPT-2 -> {run_dir} (Ctrl-C stops cleanly; rerun to resume)")
    cfg = TrainConfig.load(None, overrides or [], defaults=demo_config(data_dir, run_dir))
    result = train(cfg)

    print(f"[3/3] sampling from {run_dir} (prompt {PROMPT!r}, temperature 0.8, top-k 40)")
    tok = load_tokenizer()
    model = load_model(run_dir).eval()
    [new] = generate(model, [tok.encode(PROMPT)], max_new_tokens, temperature=0.8, top_k=40, seed=0)
    print("-" * 60 + "\n" + PROMPT + tok.decode(new) + "\n" + "-" * 60)

    try:
        gpt2 = load_model("gpt2", offline=True).eval()
    except GPT2LabError:
        print(
            "real GPT-2 weights are not in the local Hugging Face cache; with a network, "
            "`gpt2lab generate --model gpt2 --prompt ...` downloads them (500 MB) and samples."
        )
    else:
        prompt = "The meaning of life is"
        [new] = generate(gpt2, [tok.encode(prompt)], max_new_tokens, temperature=0.8, top_k=40, seed=0)
        print(f"GPT-2 124M (from the local cache):\n{prompt}{tok.decode(new)}\n" + "-" * 60)

    ckpt = result.checkpoint
    print(f"checkpoint: {ckpt}\nval loss: {result.val_loss if result.val_loss is not None else 'see metrics.jsonl'}")
    print("next:")
    print(f"  gpt2lab generate --model {run_dir} --prompt 'import os' --max-new-tokens 100")
    print(f"  gpt2lab predict --model {run_dir} 'for i in '")
    print(f"  gpt2lab eval --model {run_dir} --data {data_dir}")
    print(f"  gpt2lab export --model {run_dir} --out {out / 'hf'}     # HF-format directory")
    print(f"  gpt2lab train --data.dir={data_dir} --run.out_dir={out / 'run2'} --model.pos_emb=rope --model.window=64")
    print("  gpt2lab compare                                            # every variant, same data, a report")
