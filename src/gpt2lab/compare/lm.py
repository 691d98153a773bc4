"""The language-model jobs: a paired training run and its final scores; the overfitting runs (the same on a
small slice of the training data, also scored on that slice); GQA uptraining of a finished multi-head run;
and a rotary run fine-tuned with position interpolation.

Every final loss is measured on the same fixed rows: ``val_tokens`` tokens of the val split in evenly spaced
windows of the training context, every token scored, so two runs' losses differ only by the models.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import numpy as np
import torch

from gpt2lab.compare.training import INIT, load_trained, run_config, train_paired, val_curve
from gpt2lab.convert import convert_to_gqa
from gpt2lab.data import TokenData
from gpt2lab.device import resolve_device
from gpt2lab.eval import stretches, token_losses
from gpt2lab.load import save_pretrained, tokenizer_of
from gpt2lab.train_config import TrainConfig

FRESH_BATCHES = 100_000  # added to a seed for the batches of a continuation (uptraining, fine-tuning)


def fixed_rows(data_dir: str, split: str, length: int, n_tokens: int) -> torch.Tensor:
    """``n_tokens // length`` evenly spaced rows of ``length + 1`` tokens of a split (inputs and targets)."""
    data = TokenData(data_dir, split)
    return stretches(data.read(0, len(data)).astype(np.int64), length, max(1, n_tokens // length))


def score(model, rows: torch.Tensor, length: int) -> dict:
    """Mean loss over every token of ``rows`` with windows of ``length``, by position and by row."""
    with torch.no_grad():
        losses = token_losses(model, rows, length)
    return {
        "loss": float(losses.mean()),
        "per_position": losses.mean(0).tolist(),
        "per_sequence": losses.mean(1).tolist(),
    }


def lm_job(params: dict, run_dir: Path, root: Path) -> dict:
    """Train one variant from its seed's paired weights, then score it on the fixed val rows (and, for an
    overfitting run, on every token of its training slice)."""
    base = TrainConfig.from_dict(params["train"])
    data = str(root / params["data"])
    cfg = run_config(base, run_dir, run_dir / INIT, data={"dir": data}, run={"seed": params["init"]["seed"]})
    records = train_paired(cfg, params["init"])
    model = load_trained(run_dir, resolve_device(base.run.device))
    T = cfg.data.block_size
    final = score(model, fixed_rows(data, "val", T, params["val_tokens"]), T)
    out = {
        "final_loss": final.pop("loss"),
        **final,
        "val_curve": val_curve(records),
        "tokens": records[-1]["tokens"],
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records[1:] or records),
    }
    if params.get("train_tokens"):
        out["train_set_loss"] = score(model, fixed_rows(data, "train", T, params["train_tokens"]), T)["loss"]
    return out


def pi_finetune_job(params: dict, run_dir: Path, root: Path) -> dict:
    """A finished rotary run fine-tuned at ``factor`` times its context with positions scaled by 1 / factor
    (position interpolation as published: Chen et al., 2023), tokens per step kept."""
    base = TrainConfig.from_dict(params["train"])
    f, steps = params["factor"], params["steps"]
    cfg = run_config(
        base,
        run_dir,
        root / params["source"],
        model={"rope_interpolation": 1.0 / f},
        data={
            "dir": str(root / params["data"]),
            "block_size": f * base.data.block_size,
            "batch_size": max(1, base.data.batch_size // f),
        },
        optim=_short_schedule(params["lr"], steps),
        run={"steps": steps, "eval_every": 0, "seed": params["seed"] + FRESH_BATCHES},
    )
    records = train_paired(cfg, None)
    return {"steps": steps, "final_train_loss": records[-1]["loss"]}


def uptrain_job(params: dict, run_dir: Path, root: Path) -> dict:
    """A finished multi-head run converted to ``kv`` key/value heads by ``method``, scored as converted and
    after uptraining for each fraction of the original steps (each from the converted weights, AdamW
    restarted, fresh batches)."""
    base = TrainConfig.from_dict(params["train"])
    T, data, device = base.data.block_size, str(root / params["data"]), resolve_device(base.run.device)
    rows = fixed_rows(data, "val", T, params["val_tokens"])
    converted = convert_to_gqa(load_trained(root / params["source"]), params["kv"], params["method"])
    save_pretrained(converted, run_dir / "converted", tokenizer_of(root / params["source"]))
    losses = {"0": score(converted.eval(), rows, T)["loss"]}
    for fraction in params["fractions"]:
        steps = max(1, round(fraction * base.run.steps))
        cfg = run_config(
            base,
            run_dir / f"uptrain-{fraction}",
            run_dir / "converted",
            data={"dir": data},
            optim=_short_schedule(params["lr"], steps),
            run={"steps": steps, "eval_every": 0, "seed": params["seed"] + FRESH_BATCHES},
        )
        train_paired(cfg, None)
        losses[str(fraction)] = score(load_trained(run_dir / f"uptrain-{fraction}", device), rows, T)["loss"]
    shutil.rmtree(run_dir / "converted")  # made again from the source run if needed
    return {"losses": losses}


def _short_schedule(lr: float, steps: int) -> dict:
    """The [optim] changes of a continuation: peak ``lr`` after 10% warmup, cosine to a tenth of it."""
    return {"lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 10)}
