"""From the jobs' results to results.json: per-seed values, paired differences with intervals, verdicts.

Everything the report and the findings quote is computed here, once, and stored; report.md and the plots
only format what results.json holds. Needs no torch.
"""

from __future__ import annotations

import math

import numpy as np

from gpt2lab.compare import stats
from gpt2lab.compare.settings import reference_of
from gpt2lab.config import GPTConfig

SCHEMA = "gpt2lab-compare/4"  # results.json's layout; the findings test skips files without it
CHANCE_BOTH = 0.25  # the most a rule that ignores the key can score on "both" (a coin flip between twins)
POSITIVE = (0.0, math.inf)  # the range of a speed: an interval is cut to it
# a longer context changes a position's loss only through the keys it adds; where it adds none the two
# losses differ by float32 round-off (1e-8 nats), which is not an effect: differences are tested at 1e-6
LOSS_DECIMALS = 6


def position_edges(length: int) -> list[int]:
    """Bins of positions in a window of ``length``: the first token, short contexts, then doublings."""
    edges = {0, 1, 4, 16, length}
    edges |= {length // 4, length // 2} if length >= 64 else set()
    return sorted(e for e in edges if e <= length)


def extrapolation_edges(context: int, length: int) -> list[int]:
    """Bins of positions in a window of ``length`` scored by a model trained on ``context`` tokens: inside
    the training length in three bins, then 1-1.25, 1.25-1.5, 1.5-2, 2-3, 3-4, 4-6, 6-8 x the context."""
    edges = {0, context // 4, context, context * 5 // 4, context * 3 // 2}
    edges |= {m * context for m in (2, 3, 4, 6, 8)}
    return sorted(e for e in edges | {length} if e <= length)


def binned(values: list[float], edges: list[int]) -> list[float]:
    """Mean of ``values`` over each [lo, hi) of ``edges``."""
    a = np.asarray(values)
    return [float(a[lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]


def columns(rows: list[list[float]]) -> list[dict]:
    """The interval over rows (seeds) of each column."""
    return [stats.interval(list(col)) for col in zip(*rows, strict=True)]


def per_window(values: list[float], length: int) -> list[float]:
    """Values over a stretch, averaged by position within consecutive windows of ``length``."""
    return np.asarray(values).reshape(-1, length).mean(0).tolist()


# --- language models -----------------------------------------------------------------------------


def lm_section(results: dict, variants: list[str], seeds: list[int], calibration: list[str], factor: int) -> dict:
    """Final losses, paired comparisons (with their difference curves over training) and the calibration."""
    runs = {v: [results[f"lm/{v}/seed{s}"] for s in seeds] for v in variants}
    T = len(runs[variants[0]][0]["per_position"])
    edges = position_edges(T)
    out: dict = {"position_edges": edges, "variants": {}, "comparisons": []}
    for v, rs in runs.items():
        out["variants"][v] = {
            "final_loss": stats.interval([r["final_loss"] for r in rs]),
            "per_seed": [r["final_loss"] for r in rs],
            "curve": _curve([r["val_curve"] for r in rs]),
            "by_position": columns([binned(r["per_position"], edges) for r in rs]),
            "tokens_per_s": stats.interval([r["tokens_per_s"] for r in rs], POSITIVE),
            "tokens": rs[0]["tokens"],
        }
    calib = {v: results[f"calibration/{v}/seed{seeds[0]}"] for v in calibration}
    for v in variants:
        ref = reference_of(v)
        if ref not in runs:
            continue
        comparison = {"variant": v, "reference": ref}
        comparison["final"] = stats.paired([r["final_loss"] for r in runs[v]], [r["final_loss"] for r in runs[ref]])
        comparison["curve"] = _difference_curve(runs[v], runs[ref])
        comparison["sequence_noise_sd"] = _sequence_noise(runs[v][0], runs[ref][0])
        if v in calib and ref in calib:
            comparison["calibration"] = _settled(comparison, calib[v], calib[ref], runs[v][0], runs[ref][0], factor)
        out["comparisons"].append(comparison)
    out["calibration"] = {
        v: {"final_loss": c["final_loss"], "curve": c["val_curve"], "tokens": c["tokens"]} for v, c in calib.items()
    }
    return out


def _curve(curves: list[list[list[float]]]) -> dict:
    steps = [s for s, _ in curves[0]]
    columns = zip(*([v for _, v in c] for c in curves), strict=True)
    return {"steps": steps, "values": [stats.interval(list(col)) for col in columns]}


def _difference_curve(runs: list[dict], refs: list[dict]) -> dict:
    """The paired difference (variant minus reference) at every evaluation step, with its interval."""
    steps = [s for s, _ in runs[0]["val_curve"]]
    diffs = [
        [a - b for (_, a), (_, b) in zip(r["val_curve"], f["val_curve"], strict=True)]
        for r, f in zip(runs, refs, strict=True)
    ]
    return {"steps": steps, "values": [stats.differences(list(col)) for col in zip(*diffs, strict=True)]}


def _sequence_noise(run: dict, ref: dict) -> float:
    """Standard error of one seed's paired difference from the finite val set alone (per-sequence sd / sqrt
    rows): how much of the seed-to-seed sd the fixed val set could explain."""
    d = np.asarray(run["per_sequence"]) - np.asarray(ref["per_sequence"])
    return float(d.std(ddof=1) / math.sqrt(len(d)))


def _settled(comparison: dict, long: dict, long_ref: dict, first: dict, first_ref: dict, factor: int) -> dict:
    """Whether the difference has settled: the first seed's difference after ``factor`` x the steps against
    the same seed's difference at the grid's steps. One seed's difference scatters about the mean by the
    seeds' sd, so a change within t(97.5%, n - 1) x sd is one another seed could show (settled); a larger
    one means the difference moves with training (transient). None where the grid has no spread to judge
    by (one seed, or every seed's difference the same)."""
    long_diff = long["final_loss"] - long_ref["final_loss"]
    first_diff = first["final_loss"] - first_ref["final_loss"]
    final = comparison["final"]
    tolerance = stats.t_quantile(1 - stats.LEVEL / 2, final["n"] - 1) * final["sd"] if final["sd"] else None
    return {
        "factor": factor,
        "difference": long_diff,
        "first_seed_difference": first_diff,
        "tolerance": tolerance,
        "curve": [[s, a - b] for (s, a), (_, b) in zip(long["val_curve"], long_ref["val_curve"], strict=True)],
        "settled": None if tolerance is None else abs(long_diff - first_diff) <= tolerance,
    }


# --- overfitting ---------------------------------------------------------------------------------


def overfitting_section(results: dict, variants: list[str], seeds: list[int], kv_heads: dict[str, int]) -> dict:
    """Train-set loss, val loss and the gap (val - train) per variant; each gap against multi-head's."""
    runs = {v: [results[f"overfit/{v}/seed{s}"] for s in seeds] for v in variants}
    gaps = {v: [r["final_loss"] - r["train_set_loss"] for r in rs] for v, rs in runs.items()}
    out: dict = {"variants": {}, "comparisons": []}
    for v, rs in runs.items():
        out["variants"][v] = {
            "n_kv_head": kv_heads[v],
            "train_loss": stats.interval([r["train_set_loss"] for r in rs]),
            "val_loss": stats.interval([r["final_loss"] for r in rs]),
            "gap": stats.interval(gaps[v]),
            "curve": _curve([r["val_curve"] for r in rs]),
            "tokens": rs[0]["tokens"],
        }
    reference = max(variants, key=lambda v: kv_heads[v])
    for v in variants:
        if v != reference:
            diff = stats.paired(gaps[v], gaps[reference], below="smaller gap", above="larger gap")
            out["comparisons"].append({"variant": v, "reference": reference, "gap": diff})
    return out


# --- uptraining ----------------------------------------------------------------------------------


def uptraining_section(results: dict, seeds: list[int], kv_heads: list[int], methods: list[str], scratch: bool) -> dict:
    """Each uptraining arm's loss against multi-head (rope) and against the converted shape from scratch; the
    share of each gap it closes, only where the scratch model is detected worse than MHA (a gap to close)."""
    mha = [results[f"lm/rope/seed{s}"]["final_loss"] for s in seeds]
    out: dict = {"mha": stats.interval(mha), "targets": []}
    for k in kv_heads:
        references = {}
        if f"uptrain/scratch-kv{k}/seed{seeds[0]}" in results:
            references["scratch_same_compute"] = [
                results[f"uptrain/scratch-kv{k}/seed{s}"]["final_loss"] for s in seeds
            ]
        if k == 1 and f"lm/rope+mqa/seed{seeds[0]}" in results:
            references["scratch_same_steps"] = [results[f"lm/rope+mqa/seed{s}"]["final_loss"] for s in seeds]
        target: dict = {"kv_heads": k, "references": {}, "arms": []}
        for name, values in references.items():
            target["references"][name] = {"loss": stats.interval(values), "vs_mha": stats.paired(values, mha)}
        for method in methods:
            arms = [results[f"uptrain/kv{k}-{method}/seed{s}"]["losses"] for s in seeds]
            for fraction in arms[0]:
                values = [a[fraction] for a in arms]
                target["arms"].append(_arm(method, float(fraction), values, mha, references))
        target["conversion_gap_closed"] = conversion_gap_closed(target)
        out["targets"].append(target)
    return out


def _arm(method: str, fraction: float, values: list[float], mha: list[float], references: dict) -> dict:
    arm = {"method": method, "fraction": fraction, "loss": stats.interval(values), "vs_mha": stats.paired(values, mha)}
    for name, ref in references.items():
        arm[f"vs_{name}"] = stats.paired(values, ref)
        gap = stats.paired(ref, mha)  # a gap to close only where the scratch model is detected worse than MHA
        closed = _share_closed(gap["values"], arm["vs_mha"]["values"]) if gap["verdict"] == "worse" else None
        arm[f"closes_{name}_gap"] = closed
    return arm


def conversion_gap_closed(target: dict) -> list[dict]:
    """Per method and fraction > 0: the share of the conversion gap (converted, not trained, minus MHA) that
    uptraining closed, where that gap is detected (None otherwise)."""
    arms = {(a["method"], a["fraction"]): a for a in target["arms"]}
    out = []
    for (method, fraction), arm in arms.items():
        start = arms.get((method, 0.0))
        if not fraction or start is None:
            continue
        detected = start["vs_mha"]["verdict"] == "worse"  # a converted model better than MHA has no gap to close
        share = _share_closed(start["vs_mha"]["values"], arm["vs_mha"]["values"]) if detected else None
        out.append({"method": method, "fraction": fraction, "gap": start["vs_mha"]["mean"], "share": share})
    return out


def _share_closed(gap_before: list[float], gap_after: list[float]) -> dict:
    """The share of a gap (per seed, a loss minus its target's) that training closed: mean(before - after) /
    mean(before), with Fieller's interval over the seeds (stats.ratio_of_means). 1 = the gap closed, 0 = as
    before, below 0 = wider."""
    closed = [b - a for b, a in zip(gap_before, gap_after, strict=True)]
    return stats.ratio_of_means(closed, gap_before)


# --- MQAR ----------------------------------------------------------------------------------------


def mqar_section(results: dict, models: dict[str, dict], seeds: list[int], edges: list[int], chance: float) -> dict:
    """Per model and distance bin: orig, both and twin over seeds with intervals and the verdict (lookup,
    positional guessing, not above chance); the plateau check of every run; paired differences to full attention."""
    out: dict = {"edges": edges, "chance": chance, "both_ceiling_without_lookup": CHANCE_BOTH, "models": {}}
    per_bin = {}
    for name, info in models.items():
        runs = [results[f"mqar/{name}/seed{s}"] for s in seeds]
        converged = [_plateaued(r["curve"], info["steps"]) for r in runs]
        fractions = [_bin_fractions(r["eval"], edges) for r in runs]  # per seed: {metric: [per bin]}
        per_bin[name] = fractions
        use = [f for f, c in zip(fractions, converged, strict=True) if c] if sum(converged) >= 2 else fractions
        bins = []
        for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:], strict=True)):
            row = {"lo": lo, "hi": hi, "queries": min(f["n"][b] for f in fractions)}
            for metric in ("orig", "both", "twin"):
                row[metric] = stats.interval([f[metric][b] for f in use], bounds=(0.0, 1.0))
            row["verdict"] = _recall_verdict(row, chance)
            bins.append(row)
        out["models"][name] = info | {
            "converged": converged,
            "verdict_seeds": len(use),
            "bins": bins,
            "curves": [r["curve"] for r in runs],
        }
    out["comparisons"] = _mqar_comparisons(per_bin, edges)
    return out


def _plateaued(curve: list[list[float]], steps: int, tolerance: float = 0.02) -> bool:
    """The in-reach accuracy moved by less than ``tolerance`` over the last 20% of training."""
    late = [acc for step, acc in curve if step >= 0.8 * steps]
    return bool(late) and abs(curve[-1][1] - late[0]) < tolerance


def _bin_fractions(ev: dict, edges: list[int]) -> dict[str, list[float]]:
    n = np.asarray(ev["n"])
    out: dict[str, list] = {"n": [int(n[lo:hi].sum()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)]}
    for metric in ("orig", "both", "twin"):
        hits = np.asarray(ev[metric])
        out[metric] = [
            float(hits[lo:hi].sum() / max(1, n[lo:hi].sum())) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        ]
    return out


def _recall_verdict(row: dict, chance: float) -> str:
    """lookup: "both" above 0.25 with its whole interval; positional guessing: right above chance on the
    original with its whole interval while "both" lies at or below 0.25 with its whole interval; not above
    chance: the original not detected above chance (which does not make it chance: its interval may reach
    well above) and "both" at or below 0.25; undecided otherwise (intervals too wide to say, as with seeds
    that split between lookup and guessing). One seed: point estimates."""
    if row["queries"] < 100:
        return "n/a (fewer than 100 queries)"
    both, orig = row["both"], row["orig"]
    both_lo = both["lo"] if both["lo"] is not None else both["mean"]
    both_hi = both["hi"] if both["hi"] is not None else both["mean"]
    orig_lo = orig["lo"] if orig["lo"] is not None else orig["mean"]
    if both_lo > CHANCE_BOTH:
        return "lookup"
    if both_hi <= CHANCE_BOTH:
        return "positional guessing" if orig_lo > chance else "not above chance"
    return "undecided"


def _mqar_comparisons(per_bin: dict, edges: list[int]) -> list[dict]:
    """Per bin, paired by seed: every model against full attention with rotary positions at its depth, and a
    mixed stack against the window stack of its depth (what the global layer buys)."""
    pairs = []
    for name in per_bin:
        depth, variant = name.split("/", 1)
        if variant != "rope" and f"{depth}/rope" in per_bin:
            pairs.append((name, f"{depth}/rope"))
        if "mixed" in variant and f"{depth}/{variant.replace('mixed', 'swa')}" in per_bin:
            pairs.append((name, f"{depth}/{variant.replace('mixed', 'swa')}"))
    out = []
    for name, ref in pairs:
        bins = []
        for b in range(len(edges) - 1):
            row = {"lo": edges[b], "hi": edges[b + 1]}
            for metric in ("orig", "both"):
                v, r = [f[metric][b] for f in per_bin[name]], [f[metric][b] for f in per_bin[ref]]
                row[metric] = stats.paired(v, r, below="worse", above="better", bounds=(-1.0, 1.0))
            bins.append(row)
        out.append({"model": name, "reference": ref, "bins": bins})
    return out


# --- extrapolation -------------------------------------------------------------------------------


def extrapolation_section(results: dict, variants: list[str], seeds: list[int], context: int) -> dict:
    """Per variant and way of scoring: the per-position difference to the 1x context by bin and the two
    headline means (just past the training length, T..1.5T, and far past it, 2T..), with intervals."""
    out: dict = {"context": context, "variants": {}}
    for v in variants:
        runs = [results[f"extrapolation/{v}/seed{s}"] for s in seeds]
        entry = {
            "chunked_loss": stats.interval([r["chunked_loss"] for r in runs]),
            "by_position_1x": columns([binned(r["chunked_by_position"], position_edges(context)) for r in runs]),
        }
        for mode in ("full", *sorted(k for k in runs[0] if k.startswith("pi"))):
            entry[mode] = _extrapolation_mode([r[mode] for r in runs], context)
        out["variants"][v] = entry
    return out


def _resolved(losses) -> list[float]:
    """Loss differences rounded to LOSS_DECIMALS: round-off alone becomes 0."""
    return [round(float(x), LOSS_DECIMALS) + 0.0 for x in losses]  # + 0.0: no -0.0


def _extrapolation_mode(runs: list, context: int) -> dict | str:
    if isinstance(runs[0], str):
        return runs[0]
    length = runs[0]["length"]
    edges = extrapolation_edges(context, length)
    curves = [per_window(r["minus_1x"], length) for r in runs]
    by_bin = list(zip(*(binned(c, edges) for c in curves), strict=True))
    out = {
        "length": length,
        "loss": stats.interval([r["loss"] for r in runs]),
        "edges": edges,
        "bins": [stats.differences(_resolved(col), below="helps", above="hurts") for col in by_bin],
        "curve": [float(np.mean(col)) for col in zip(*curves, strict=True)],
    }
    spans = {"near": (context, min(length, context * 3 // 2)), "far": (2 * context, length)}
    for name, (lo, hi) in spans.items():
        if hi > lo:
            out[name] = stats.differences(
                _resolved(np.mean(c[lo:hi]) for c in curves), below="helps", above="hurts"
            ) | {"positions": [lo, hi]}  # beside the interval's own lo and hi
    return out


# --- efficiency ----------------------------------------------------------------------------------


def efficiency_section(result: dict, configs: dict[str, GPTConfig], reference: str, kv_contexts: list[int]) -> dict:
    """Decode speed ratios to the reference and window/full kernel-time ratios, each the geometric mean over
    alternated rounds with its 95% interval; KV-cache bytes of every variant by context (None past a learned
    position table)."""
    decode = []
    for setting in result["decode"]:
        for variant, pairs in setting["rates"].items():
            ratio = _ratio([math.log(v / r) for r, v in pairs], below="slower", above="faster")
            decode.append(
                {
                    "batch": setting["batch"],
                    "context": setting["context"],
                    "variant": variant,
                    "reference_tokens_per_s": stats.interval([r for r, _ in pairs], POSITIVE),
                    "tokens_per_s": stats.interval([v for _, v in pairs], POSITIVE),
                    "ratio": ratio,
                }
            )
    kernels = []
    for row in result["kernels"]:
        full = row["seconds"]["full causal (SDPA)"]
        entry = {k: row[k] for k in ("context", "window", "ratio")} | {"ms": {}, "vs_full": {}}
        for name, seconds in row["seconds"].items():
            entry["ms"][name] = 1e3 * float(np.median(seconds))
            if name != "full causal (SDPA)":
                logs = [math.log(w / f) for w, f in zip(seconds, full, strict=True)]
                entry["vs_full"][name] = _ratio(logs, below="faster", above="slower")
        kernels.append(entry)
    element = 2 if result["dtype"] == "bfloat16" else 4
    kv = {
        name: [c.kv_cache_bytes(n, element) if n <= (c.max_positions or n) else None for n in kv_contexts]
        for name, c in configs.items()
    }
    return {
        "device": result["device"],
        "dtype": result["dtype"],
        "reference": reference,
        "decode": decode,
        "kernels": kernels,
        "kv_cache": {"contexts": kv_contexts, "bytes": kv, "bytes_per_element": element},
    }


def _ratio(log_ratios: list[float], below: str, above: str) -> dict:
    d = stats.differences(log_ratios, below=below, above=above)
    exp = lambda x: None if x is None else math.exp(x)  # noqa: E731
    return {
        "mean": exp(d["mean"]),
        "lo": exp(d["lo"]),
        "hi": exp(d["hi"]),
        "n": d["n"],
        "verdict": d["verdict"],
        "p": d["p"],
        "mdd80_factor": exp(d["mdd80"]),
    }


def model_table(configs: dict[str, GPTConfig]) -> dict:
    """Parameters (all, and without the token and position tables) and KV bytes per token of every model."""
    out = {}
    for name, c in configs.items():
        tables = c.padded_vocab_size * c.n_embd + (c.block_size * c.n_embd if c.pos_emb == "learned" else 0)
        out[name] = {
            "config": c.to_dict(),
            "params": c.num_params(),
            "non_embedding_params": c.num_params() - tables,
            "kv_bytes_per_token_fp32": c.kv_cache_bytes_per_token(4),
            "kv_bytes_per_token_bf16": c.kv_cache_bytes_per_token(2),
        }
    return out


def mark_holm(results: dict) -> int:
    """Mark each test the report gives a verdict (language-model comparisons, MQAR per-bin differences,
    extrapolation headlines, uptraining arms and references, overfitting, decode speed and kernel-time
    ratios) with whether it survives Holm's correction at family level 5%; returns the family size."""
    tests = []
    for c in results.get("lm", {}).get("comparisons", []):
        tests.append(c["final"])
    for c in results.get("mqar", {}).get("comparisons", []):
        tests += [b[m] for b in c["bins"] for m in ("orig", "both")]
    for v in results.get("extrapolation", {}).get("variants", {}).values():
        tests += [m[h] for m in v.values() if isinstance(m, dict) and "bins" in m for h in ("near", "far") if h in m]
    for t in results.get("uptraining", {}).get("targets", []):
        tests += [a[k] for a in t["arms"] for k in a if k.startswith("vs_")]
        tests += [ref["vs_mha"] for ref in t["references"].values()]
    tests += [c["gap"] for c in results.get("overfitting", {}).get("comparisons", [])]
    efficiency = results.get("efficiency", {})
    tests += [d["ratio"] for d in efficiency.get("decode", [])]
    tests += [v for k in efficiency.get("kernels", []) for v in k["vs_full"].values()]
    survives = stats.holm([t.get("p") for t in tests])
    for test, ok in zip(tests, survives, strict=True):
        test["holm"] = ok
    return sum(t.get("p") is not None for t in tests)
