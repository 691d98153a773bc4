"""The comparison's figures, drawn from results.json alone (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PLOTS = ("loss_curves.png", "memory_speed.png", "extrapolation.png", "recall.png")
MIB = 2**20


def write_plots(results: dict, out: Path, dpi: int = 90) -> None:
    """loss_curves.png, memory_speed.png, extrapolation.png and recall.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["variants"])
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    for draw, name in zip((_loss_curves, _memory_speed, _extrapolation, _recall), PLOTS, strict=True):
        fig = draw(plt, results, colors)
        fig.tight_layout()
        fig.savefig(out / name, dpi=dpi)
        plt.close(fig)


def _loss_curves(plt, results: dict, colors: dict):
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, v in results["variants"].items():
        steps = [s for s, _ in v["runs"][0]["val_curve"]]
        losses = np.array([[loss for _, loss in r["val_curve"]] for r in v["runs"]])  # (seeds, evals)
        ax.plot(steps, losses.mean(0), label=name, color=colors[name])
        ax.fill_between(steps, losses.min(0), losses.max(0), color=colors[name], alpha=0.15)
    ax.set(
        xlabel="step",
        ylabel="val loss",
        title=f"Validation loss (mean, band = min-max of {len(results['seeds'])} seeds)",
    )
    ax.legend(fontsize=8)
    return fig


def _memory_speed(plt, results: dict, colors: dict):
    variants, ctx = results["variants"], results["config"]["compare"]["decode_context"]
    names = list(variants)
    bars = [
        ("train tokens/s", [variants[n]["summary"]["tokens_per_s"] for n in names], 1.0),
        ("peak train memory (MiB)", [variants[n]["summary"]["peak_memory_bytes"] for n in names], MIB),
        (f"KV cache at {ctx} tokens (MiB)", [variants[n]["decode"]["cache_bytes"] for n in names], MIB),
        (f"decode tokens/s at {ctx}", [variants[n]["decode"]["tokens_per_s"] for n in names], 1.0),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for ax, (title, values, scale) in zip(axes, bars, strict=True):
        heights = [_mean(v) / scale if _mean(v) is not None else 0.0 for v in values]
        errors = [v["std"] / scale if isinstance(v, dict) else 0.0 for v in values]
        ax.bar(range(len(names)), heights, yerr=errors, color=[colors[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    return fig


def _extrapolation(plt, results: dict, colors: dict):
    fig, ax = plt.subplots(figsize=(6.4, 4))
    factors = results["config"]["compare"]["extrapolation"]
    missing = []
    for name, v in results["variants"].items():
        points = [(f, v["summary"]["context_loss"][f"{f}x"]) for f in factors]
        runnable = [(f, s["mean"]) for f, s in points if isinstance(s, dict)]
        if len(runnable) < len(points):
            missing.append(name)
        ax.plot(*zip(*runnable, strict=True), marker="o", label=name, color=colors[name])
    ax.set_xticks(factors, [f"{f}x\n({f * results['context']})" for f in factors])
    ax.set(xlabel="evaluation context (multiple of the training context)", ylabel="val loss")
    ax.set_title("Context extrapolation" + (f"\n(stop at 1x: {', '.join(missing)})" if missing else ""), fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _recall(plt, results: dict, colors: dict):
    fig, ax = plt.subplots(figsize=(6.4, 4))
    variants = results["variants"]
    middles = [(lo + hi - 1) / 2 for lo, hi in results["recall_bins"]]
    for name, v in variants.items():
        acc = [_mean(a) for a in v["summary"]["recall_accuracy"]]
        points = [(m, a) for m, a in zip(middles, acc, strict=True) if a is not None]
        ax.plot(*zip(*points, strict=True), marker="o", label=name, color=colors[name])
    points = [(m, r) for m, r in zip(middles, results["recall_reference"], strict=True) if r is not None]
    ax.plot(*zip(*points, strict=True), color="black", linestyle=":", linewidth=1, label="key ignored (reference)")
    window = results["config"]["compare"]["window"]
    n_layer = next(iter(variants.values()))["model_config"]["n_layer"]
    for x, label in ((window, f" window {window}"), (n_layer * (window - 1), f" {n_layer} x (window - 1)")):
        ax.axvline(x, color="gray", linestyle="--", linewidth=1)
        ax.text(x, 1.02, label, fontsize=8, color="gray")
    ax.set(xlabel="distance from the planted pair to the query (tokens, bin middles)", ylabel="recall accuracy")
    ax.set_ylim(0, 1.08)
    n = results["config"]["compare"]["recall_seeds"]
    ax.set_title(f"Long-range recall (mean of {n} seed{'s' * (n > 1)})", fontsize=9)
    ax.legend(fontsize=8)
    return fig


def _mean(value) -> float | None:
    return value["mean"] if isinstance(value, dict) else value
