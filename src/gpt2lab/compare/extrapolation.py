"""Length extrapolation: the loss of every token of long val stretches with the whole stretch as context,
minus its loss with the context cut at the previous multiple of the training length (the 1x reference: the
stretch in windows of T), on the same tokens, so content noise cancels. Below 0 the longer context helps;
above 0 the model is hurt by positions (or distances) it never saw in training.

Scored per model: the plain model at ``factor`` x T; a rotary one also with zero-shot position interpolation
(``rope_interpolation = 1/f`` at f x T) and, where it was fine-tuned, with interpolation after its fine-tune
(at its target length, and at 1x: the fine-tune's own effect). A learned-position model reports the error
it raises instead of a number.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from gpt2lab.compare.lm import fixed_rows
from gpt2lab.compare.training import load_trained
from gpt2lab.device import resolve_device
from gpt2lab.eval import token_losses
from gpt2lab.model import GPT


def extrapolation_job(params: dict, run_dir: Path, root: Path) -> dict:
    """Per-position differences (context minus 1x) over the stretch for each way of scoring the model of
    ``params["model"]``: ``full`` (factor x T), ``pi<f>`` (zero-shot interpolation), ``pi_finetuned``."""
    device = resolve_device(params["device"])
    model = load_trained(root / params["model"], device)
    T, factor = params["context"], params["factor"]
    rows = fixed_rows(str(root / params["data"]), "val", factor * T, params["stretches"] * factor * T)
    chunked = token_losses(model, rows, T)  # (stretches, factor * T)
    out: dict = {"chunked_loss": float(chunked.mean()), "chunked_by_position": chunked[:, :T].mean(0).tolist()}
    out["full"] = _minus(model, rows, factor * T, chunked)
    if model.config.pos_emb == "rope":
        for f in params["pi_factors"]:
            out[f"pi{f}"] = _minus(_interpolated(model, 1.0 / f), rows, f * T, chunked)
    if params.get("pi_model"):
        tuned = load_trained(root / params["pi_model"], device)
        out["pi_finetuned"] = _minus(tuned, rows, round(1 / tuned.config.rope_interpolation) * T, chunked)
        out["pi_finetuned_1x"] = _minus(tuned, rows, T, chunked)  # the same model at 1x: its fine-tune alone
    return out


def _minus(model: GPT, rows, length: int, chunked: np.ndarray) -> dict | str:
    """Loss with windows of ``length`` minus the 1x loss, by position in the stretch (mean over stretches),
    and the mean loss; or the error text of a model that cannot run that long."""
    try:
        losses = token_losses(model, rows, length)
    except ValueError as e:
        return f"error: {e}"
    return {"length": length, "loss": float(losses.mean()), "minus_1x": (losses - chunked).mean(0).tolist()}


def _interpolated(model: GPT, scale: float) -> GPT:
    """The same weights with rotary positions multiplied by ``scale`` (zero-shot position interpolation)."""
    config = dataclasses.replace(model.config, rope_interpolation=scale)
    return GPT.from_state_dict(config, model.state_dict(), device=model.wte.weight.device).eval()
