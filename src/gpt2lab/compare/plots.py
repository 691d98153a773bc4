"""The comparison's figures, drawn from results.json alone (matplotlib, Agg backend).

Every point carries its 95% interval (a band or an error bar), every line has markers and a small horizontal
offset so none hides another, zoomed axes show the final differences instead of the first steps, memory is
on a log axis, and every title states n (seeds or rounds).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2lab import files

PLOTS = ("lm.png", "mqar.png", "extrapolation.png", "uptraining.png", "overfitting.png", "efficiency.png")
MARKERS = "osD^v<>pXh*"


def write_plots(results: dict, out: Path, dpi: int = 90) -> None:
    """Each figure of ``PLOTS`` that the results have data for, each file replaced whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    draws = {
        "lm.png": _lm,
        "mqar.png": _mqar,
        "extrapolation.png": _extrapolation,
        "uptraining.png": _uptraining,
        "overfitting.png": _overfitting,
        "efficiency.png": _efficiency,
    }
    for name in PLOTS:
        fig = draws[name](plt, results)
        if fig is None:
            continue
        fig.tight_layout()
        files.write_atomic(out / name, lambda f, fig=fig: fig.savefig(f, dpi=dpi, format="png"))
        plt.close(fig)


def _style(i: int) -> dict:
    import matplotlib.pyplot as plt

    return {"color": plt.cm.tab10(i % 10), "marker": MARKERS[i % len(MARKERS)], "markersize": 4}


def _band(ax, x, intervals: list[dict], i: int, label: str, offset: float = 0.0) -> None:
    """A mean line with markers and its 95% band (no band where n = 1)."""
    x = np.asarray(x, dtype=float) + offset
    mean = [d["mean"] for d in intervals]
    ax.plot(x, mean, label=label, linewidth=1.2, **_style(i))
    if all(d.get("lo") is not None for d in intervals):
        ax.fill_between(
            x, [d["lo"] for d in intervals], [d["hi"] for d in intervals], color=_style(i)["color"], alpha=0.15
        )


def _errorbars(ax, x, intervals: list[dict], i: int, label: str, offset: float = 0.0) -> None:
    """Points with 95% error bars, shifted by ``offset`` so neighbouring series stay visible."""
    x = np.asarray(x, dtype=float) + offset
    mean = np.array([d["mean"] for d in intervals])
    lo = np.array([d["lo"] if d.get("lo") is not None else d["mean"] for d in intervals])
    hi = np.array([d["hi"] if d.get("hi") is not None else d["mean"] for d in intervals])
    ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], label=label, capsize=2, linewidth=1, **_style(i))


def _lm(plt, r: dict):
    lm, n = r["lm"], len(r["seeds"])
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0, 0]
    late = []
    for i, (v, e) in enumerate(lm["variants"].items()):
        _band(ax, e["curve"]["steps"], e["curve"]["values"], i, v)
        late += [
            d["mean"]
            for s, d in zip(e["curve"]["steps"], e["curve"]["values"], strict=True)
            if s >= e["curve"]["steps"][-1] / 4
        ]
    ax.set_ylim(min(late) - 0.05, max(late) + 0.05)
    ax.set(
        xlabel="step",
        ylabel="val loss (curve set)",
        title=f"Validation loss, last 3/4 of training (n = {n} seeds, 95% bands)",
    )
    ax.legend(fontsize=7)
    ax = axes[0, 1]
    for i, (v, e) in enumerate(lm["variants"].items()):
        _errorbars(ax, [i], [e["final_loss"]], i, v)
    ax.set_xticks(range(len(lm["variants"])), list(lm["variants"]), rotation=30, fontsize=8)
    ax.set(ylabel="final val loss", title=f"Final loss on the fixed val tokens (n = {n} seeds, 95% intervals)")
    ax = axes[1, 0]
    names = list(lm["variants"])
    for i, c in enumerate(lm["comparisons"]):
        k = names.index(c["variant"])  # coloured as its variant in the other panels
        _band(ax, c["curve"]["steps"], c["curve"]["values"], k, f"{c['variant']} - {c['reference']}", offset=i)
        if "calibration" in c:
            steps, diffs = zip(*c["calibration"]["curve"], strict=True)
            ax.plot(
                steps,
                diffs,
                linestyle="--",
                color=_style(k)["color"],
                label=f"  calibration, {c['calibration']['factor']}x steps (1 seed)",
            )
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set(
        xlabel="step", ylabel="difference in val loss", title=f"Paired difference to the reference (n = {n}, 95% bands)"
    )
    ax.legend(fontsize=7)
    ax = axes[1, 1]
    edges = lm["position_edges"]
    mids = [(lo + hi - 1) / 2 + 0.5 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    for i, (v, e) in enumerate(lm["variants"].items()):
        _errorbars(ax, np.asarray(mids) * (1 + 0.03 * i), e["by_position"], i, v)
    ax.set_xscale("log")
    ax.set(
        xlabel="position in the context (bin middles)",
        ylabel="final val loss",
        title=f"Loss by position (n = {n} seeds)",
    )
    ax.legend(fontsize=7)
    return fig


def _mqar(plt, r: dict):
    if "mqar" not in r:
        return None
    m = r["mqar"]
    depths = sorted({name.split("/")[0] for name in m["models"]})
    fig, axes = plt.subplots(len(depths), 3, figsize=(15, 4 * len(depths)), squeeze=False)
    n = len(r["seeds"])
    edges = m["edges"]
    x = np.arange(len(edges) - 1)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
    for row, depth in enumerate(depths):
        models = {k: v for k, v in m["models"].items() if k.startswith(depth + "/")}
        for col, metric in enumerate(("orig", "both")):
            ax = axes[row, col]
            for i, (name, model) in enumerate(models.items()):  # bins from the seeds that plateaued
                label = f"{name} (n = {model['verdict_seeds']})"
                _errorbars(ax, x, [b[metric] for b in model["bins"]], i, label, offset=0.08 * (i - len(models) / 2))
            ax.axhline(
                m["chance"] if metric == "orig" else m["both_ceiling_without_lookup"], color="gray", linestyle=":"
            )
            ax.set_xticks(x, labels, fontsize=7)
            ax.set_ylim(-0.03, 1.05)
            what = "right on the original" if metric == "orig" else "right on both copies (dotted: 0.25 without lookup)"
            ax.set(xlabel="planted distance d (bins)", ylabel=metric, title=f"{depth}: {what}")  # n: in the legend
            ax.legend(fontsize=7)
        ax = axes[row, 2]
        for i, (name, model) in enumerate(models.items()):
            for j, curve in enumerate(model["curves"]):
                steps, acc = zip(*curve, strict=True)
                ax.plot(steps, acc, linewidth=0.8, label=name if j == 0 else None, **_style(i))
        ax.set(
            xlabel="step",
            ylabel="accuracy within reach",
            title=f"{depth}: training curves, one line per seed (n = {n})",
        )
        ax.set_ylim(-0.03, 1.05)
        ax.legend(fontsize=7)
    return fig


def _extrapolation(plt, r: dict):
    if "extrapolation" not in r:
        return None
    e, n = r["extrapolation"], len(r["seeds"])
    T = e["context"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    plain = [(v, entry["full"]) for v, entry in e["variants"].items() if isinstance(entry.get("full"), dict)]
    rope = e["variants"].get("rope", {})
    pi = [(k, m) for k, m in rope.items() if k.startswith("pi") and isinstance(m, dict)]
    for ax, series, title in (
        (axes[0], plain, "whole stretch as context"),
        (axes[1], [("rope", rope["full"])] + pi if pi else [], "rope with position interpolation"),
    ):
        for i, (label, mode) in enumerate(series):
            edges = mode["edges"]
            mids = [(lo + hi) / 2 for lo, hi in zip(edges[:-1], edges[1:], strict=True)]
            _errorbars(ax, np.asarray(mids) * (1 + 0.02 * i), mode["bins"], i, f"{label} ({mode['length']} tokens)")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.axvline(T, color="gray", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set(
            xlabel="position in the window (tokens; dashed: training length)",
            ylabel="loss minus the 1x context's",
            title=f"Extrapolation: {title} (n = {n} seeds)",
        )
        ax.legend(fontsize=7)
    return fig


def _uptraining(plt, r: dict):
    if "uptraining" not in r:
        return None
    u, n = r["uptraining"], len(r["seeds"])
    fig, axes = plt.subplots(1, len(u["targets"]), figsize=(6.5 * len(u["targets"]), 4.5), squeeze=False)
    for ax, t in zip(axes[0], u["targets"], strict=True):
        methods = sorted({a["method"] for a in t["arms"]})
        for i, method in enumerate(methods):
            arms = [a for a in t["arms"] if a["method"] == method]
            _errorbars(
                ax,
                [100 * a["fraction"] for a in arms],
                [a["loss"] for a in arms],
                i,
                f"converted ({method}), uptrained",
                offset=0.15 * i,
            )
        lines = {
            "multi-head": u["mha"],
            **{name.replace("_", " "): ref["loss"] for name, ref in t["references"].items()},
        }
        for j, (label, d) in enumerate(lines.items()):
            ax.axhline(d["mean"], color=_style(len(methods) + j)["color"], linestyle="--", linewidth=1, label=label)
        ax.set(
            xlabel="uptraining steps (% of the original run)",
            ylabel="final val loss",
            title=f"{t['kv_heads']} key/value head(s): uptraining (n = {n} seeds)",
        )
        ax.legend(fontsize=7)
    return fig


def _overfitting(plt, r: dict):
    if "overfitting" not in r:
        return None
    o, n = r["overfitting"], len(r["seeds"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (v, e) in enumerate(o["variants"].items()):
        _band(axes[0], e["curve"]["steps"], e["curve"]["values"], i, f"{v} ({e['n_kv_head']} kv heads)")
        _errorbars(axes[1], [i], [e["gap"]], i, v)
    axes[0].set(xlabel="step", ylabel="val loss", title=f"Val loss while overfitting a small slice (n = {n} seeds)")
    axes[0].legend(fontsize=7)
    axes[1].set_xticks(range(len(o["variants"])), list(o["variants"]), fontsize=8)
    axes[1].set(ylabel="val - train loss", title=f"Generalisation gap (n = {n} seeds, 95% intervals)")
    return fig


def _efficiency(plt, r: dict):
    f = r["efficiency"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    settings = sorted({(d["batch"], d["context"]) for d in f["decode"]})
    variants = list(dict.fromkeys(d["variant"] for d in f["decode"]))
    order = r["config"]["compare"]["variants"]  # one colour per variant in every panel, as in the LM plots
    colour = lambda name: order.index(name) if name in order else len(order)
    for i, v in enumerate(variants):
        rows = [d for d in f["decode"] if d["variant"] == v]
        x = [settings.index((d["batch"], d["context"])) for d in rows]
        _errorbars(ax, x, [d["ratio"] for d in rows], colour(v), v, offset=0.08 * (i - len(variants) / 2))
    rounds = f["decode"][0]["ratio"]["n"] if f["decode"] else 0
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(settings)), [f"B{b}\n{c}" for b, c in settings], fontsize=7)
    ax.set(ylabel=f"decode tokens/s / {f['reference']}'s", title=f"Decode speed ratio (n = {rounds} alternated rounds)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, T in enumerate(sorted({k["context"] for k in f["kernels"]})):
        rows = [k for k in f["kernels"] if k["context"] == T]
        for j, name in enumerate(rows[0]["vs_full"]):
            _errorbars(
                ax,
                [k["ratio"] * (1 + 0.04 * (2 * i + j)) for k in rows],
                [k["vs_full"][name] for k in rows],
                2 * i + j,
                f"T={T}: {name}",
            )
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    kr = r["config"]["efficiency"]["kernel_rounds"]
    ax.set(
        xlabel="context / window",
        ylabel="time / full causal attention",
        title=f"Window kernels (n = {kr} rounds, {f['device']})",
    )
    ax.legend(fontsize=7)
    ax = axes[2]
    kv = f["kv_cache"]
    for i, (name, values) in enumerate(kv["bytes"].items()):
        points = [(c, b) for c, b in zip(kv["contexts"], values, strict=True) if b is not None]
        if not points:
            continue
        x, y = zip(*points, strict=True)
        ax.plot(np.asarray(x) * (1 + 0.03 * i), np.asarray(y) / 2**20, label=name, **_style(colour(name)))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="context (tokens)", ylabel="KV cache of one sequence (MiB)", title="KV cache, computed (log-log)")
    ax.legend(fontsize=7)
    return fig
