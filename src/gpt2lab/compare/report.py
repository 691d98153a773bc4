"""report.md: every number in it is read from results.json (and formatted by the helpers below)."""

from __future__ import annotations

import itertools

from gpt2lab import settings

RESULTS, REPORT = "results.json", "report.md"
NOT_RUN = "not run"


def render_report(results: dict) -> str:
    """report.md from ``results`` alone."""
    sections = (_header, _setup, _language_models, _mqar, _extrapolation, _uptraining, _overfitting, _efficiency, _runs)
    return "\n".join(line for section in sections for line in section(results))


# --- formatting ----------------------------------------------------------------------------------


def num(value, digits: int = 4, sign: bool = False) -> str:
    """A number as the report prints it (``n/a`` for None)."""
    if value is None:
        return "n/a"
    return f"{value:{'+' if sign else ''},.{digits}f}"


def ci(d: dict | None, digits: int = 4, sign: bool = False) -> str:
    """``mean [lo, hi]``: a mean and its 95% interval (the mean alone with one seed)."""
    if d is None:
        return "n/a"
    if d.get("lo") is None:
        return num(d["mean"], digits, sign)
    return f"{num(d['mean'], digits, sign)} [{num(d['lo'], digits, sign)}, {num(d['hi'], digits, sign)}]"


def ratio(d: dict) -> str:
    """A geometric-mean ratio with its interval: ``1.23x [1.10, 1.37]``."""
    if d.get("lo") is None:
        return f"{d['mean']:.2f}x"
    return f"{d['mean']:.2f}x [{d['lo']:.2f}, {d['hi']:.2f}]"


def verdict(d: dict, digits: int = 4) -> str:
    """The verdict, with the minimal detectable difference where nothing was detected (a factor for a
    ratio), and Holm's mark."""
    text = d["verdict"]
    if text == "no difference detected" and d.get("mdd80") is not None:
        text += f" (MDD80 {num(d['mdd80'], digits)})"
    elif text == "no difference detected" and d.get("mdd80_factor") is not None:
        text += f" (MDD80 {d['mdd80_factor']:.2f}x)"
    return text + (" †" if d.get("holm") else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


# --- sections ------------------------------------------------------------------------------------


def _header(r: dict) -> list[str]:
    env, plan = r["environment"], r["plan"]
    rows = [
        [p["piece"], str(p["jobs"]), num(p["cost_s"], 0), num(plan["measured"].get(p["piece"]), 0)]
        for p in plan["pieces"]
    ]
    rows.append(
        [
            "total",
            str(sum(p["jobs"] for p in plan["pieces"])),
            num(sum(p["cost_s"] for p in plan["pieces"]), 0),
            num(sum(plan["measured"].values()), 0),
        ]
    )
    return [
        "# Architectural variants compared",
        "",
        f"Produced by `{r['command']}` (profile {r['profile']}) in {r['runtime_s'] / 60:.1f} min{_reused(r)} on "
        f"{env['device']}, {plan['workers']} worker process(es), torch {env['torch']}, Python {env['python']}. "
        f"{_jobs_ran_on(env)}Every number below is "
        f"read from `{RESULTS}` beside this file; each training run's `metrics.jsonl` is under `runs/<job>/`.",
        "",
        f"**How to read it.** Every quality figure is over {len(r['seeds'])} paired seeds ({', '.join(map(str, r['seeds']))}): "
        "per seed, every variant starts from the same initial weights (copied where names and shapes match; fewer "
        "key/value heads take the first ones) and sees the same batches, so each comparison is a paired difference, "
        "reported as its mean and 95% t-interval [lo, hi]. The verdict names the side of 0 the whole interval lies on; "
        'otherwise it says "no difference detected" with MDD80, the smallest true difference this run would have '
        "detected about four times in five (80% power): a smaller effect is not excluded. A difference the same in "
        "every seed has no spread to test (untested, and says so). † marks verdicts that survive Holm's correction "
        f"over all {r['holm_family']} tested verdicts of this report (family level 5%).",
        "",
        f"Plan (printed before the run; all {num(sum(row['jobs'] for row in plan['pieces']), 0)} jobs estimated at "
        f"{plan.get('estimated_all_s', plan['estimated_wall_s']) / 60:.1f} min over {plan['workers']} worker(s), "
        f"{plan['how']}) against what each piece took when it ran (seconds summed over its jobs):",
        "",
        *table(["piece", "jobs", "estimated s", "measured s"], rows),
    ]


def _jobs_ran_on(env: dict) -> str:
    """Where the jobs ran, as each recorded it, unless all ran where this report was made."""
    machines = env.get("jobs_ran_on", {})
    if list(machines) == [env.get("machine")]:
        return ""
    parts = [f"{n} job(s) on {m}" if m != "not recorded" else f"{n} job(s) recorded none" for m, n in machines.items()]
    return f"Where its jobs ran, as each recorded its machine: {'; '.join(parts)}. "


def _reused(r: dict) -> str:
    """How much of the run an earlier invocation in the same directory did (its finished jobs are reused)."""
    reused, total = r["plan"].get("reused", 0), sum(row["jobs"] for row in r["plan"]["pieces"])
    return f", reusing {reused} of {total} jobs finished by an earlier run in this directory" if reused else ""


def _setup(r: dict) -> list[str]:
    data = r["data"]
    rows = [
        [
            name,
            f"{m['params']:,}",
            f"{m['non_embedding_params']:,}",
            f"{m['kv_bytes_per_token_fp32']:,}",
            _describe(m["config"]),
        ]
        for name, m in r["models"].items()
    ]
    cov = data.get("coverage") or {}
    spelled = (
        f", {100 * cov['val_spelled_fraction']:.1f}% of val GPT-2 tokens spelled as bytes"
        if "val_spelled_fraction" in cov
        else ""
    )
    return [
        "## Setup",
        "",
        f"Data: `{data['source']}` (Python {data['python']}; the stdlib differs between Python versions), vocabulary "
        f"{data['vocab_size']}{spelled}; {data['train_tokens']:,} train and {data['val_tokens']:,} val tokens "
        f"(digest {data['id']}). Final losses are on the same {r['config']['compare']['val_tokens']:,} val tokens for "
        "every run (evenly spaced windows of the training context, every token scored).",
        "",
        *table(["variant", "parameters", "non-embedding", "KV bytes per token (fp32)", "architecture"], rows),
        "Configuration (the profile plus the command's options; `gpt2lab compare --help` explains each key):",
        "",
        "```toml",
        settings.to_toml(r["config"]),
        "```",
        "",
    ]


def _describe(c: dict) -> str:
    parts = [f"{c['n_layer']} layers, {c['n_head']} heads of {c['n_embd'] // c['n_head']}, {c['pos_emb']} positions"]
    if c["n_kv_head"] != c["n_head"]:
        parts.append(f"{c['n_kv_head']} key/value heads")
    if c["window"]:
        parts.append(f"window {c['window']} ({c['window_pattern']})")
    return ", ".join(parts)


def _language_models(r: dict) -> list[str]:
    lm, cfg = r["lm"], r["config"]
    n = len(r["seeds"])
    rows = [
        [v, ci(e["final_loss"]), str(e["final_loss"]["n"]), f"{e['tokens']:,}", ci(e["tokens_per_s"], 0)]
        for v, e in lm["variants"].items()
    ]
    lines = [
        "## Language models",
        "",
        f"{cfg['run']['steps']} steps of {cfg['data']['batch_size']} x {cfg['data']['block_size']} tokens, AdamW "
        f"{cfg['optim']['lr']} -> {cfg['optim']['min_lr']} (cosine, {cfg['optim']['warmup_steps']} warmup steps). "
        "Final val loss (nats per token), mean [95% interval] over seeds:",
        "",
        *table(["variant", "final val loss", "n", "tokens per run", "train tokens/s"], rows),
        f"Paired differences (variant minus reference, n = {n}); a difference is *settled* when the calibration "
        "run (first seed, more steps) gives within t x sd of that seed's difference here (the scatter of one "
        "seed's difference), else the verdict is transient:",
        "",
    ]
    rows = []
    for c in lm["comparisons"]:
        cal = c.get("calibration")
        if cal is None:
            settled = "not calibrated"
        else:
            word = {True: "settled", False: "TRANSIENT", None: "undecided (no spread between seeds)"}[cal["settled"]]
            settled = (
                f"{word}: {num(cal['difference'], 4, True)} at {cal['factor']}x steps "
                f"(first seed {num(cal['first_seed_difference'], 4, True)} here"
                + (f", tolerance {num(cal['tolerance'], 4)})" if cal["tolerance"] is not None else ")")
            )
        rows.append(
            [
                f"{c['variant']} - {c['reference']}",
                ci(c["final"], 4, True),
                num(c["final"]["sd"]),
                num(c["final"]["mdd80"]),
                verdict(c["final"]),
                settled,
                num(c["sequence_noise_sd"]),
            ]
        )
    lines += table(
        [
            "comparison",
            "mean difference [95%]",
            "sd of differences",
            "MDD80",
            "verdict",
            "calibration",
            "val-set noise (one seed)",
        ],
        rows,
    )
    lines += _difference_curves(lm) + _by_position(lm)
    return lines + ["![language models](lm.png)", ""]


def _difference_curves(lm: dict) -> list[str]:
    if not lm["comparisons"]:
        return []
    steps = lm["comparisons"][0]["curve"]["steps"]
    rows = [
        [f"{c['variant']} - {c['reference']}", *(ci(v, 3, True) for v in c["curve"]["values"])]
        for c in lm["comparisons"]
    ]
    return [
        "Difference to the reference over training (val loss on the curve set at each evaluation):",
        "",
        *table(["comparison", *(f"step {s}" for s in steps)], rows),
    ]


def _by_position(lm: dict) -> list[str]:
    edges = lm["position_edges"]
    header = ["variant", *(f"pos {lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:], strict=True))]
    rows = [[v, *(ci(b, 3) for b in e["by_position"])] for v, e in lm["variants"].items()]
    return [
        "Final loss by position in the context (a model that uses its context gets better with position):",
        "",
        *table(header, rows),
    ]


def _mqar(r: dict) -> list[str]:
    if "mqar" not in r:
        return ["## Multi-query associative recall", "", NOT_RUN, ""]
    m, task = r["mqar"], r["mqar"]["task"]
    lines = [
        "## Multi-query associative recall (MQAR)",
        "",
        f"Sequences of {task['seq_len']} tokens with {task['groups']} twin groups of fused key-value pairs "
        f"({task['n_keys']} keys, {task['n_values']} values), every pair queried once at a planted distance d (training "
        f"distances {task['distances']}), every other position a query too. Orig: right on the sequence; both: right on "
        "it and on the copy whose twins' keys are swapped (a rule that ignores the key is right on at most one of the "
        f"two: both <= {m['both_ceiling_without_lookup']}); twin: answered the twin's value. Chance is {num(m['chance'], 3)}. "
        "Verdict per bin: lookup (both's interval above 0.25), positional guessing (orig's interval above chance, "
        "both's at or below 0.25), not above chance (orig's interval not above chance, which may still reach above it; "
        "both's at or below 0.25), undecided (the "
        "intervals allow either). Bins use the runs whose in-reach accuracy had plateaued (last 20% of steps moved < 0.02) "
        "when at least two had; the table says how many.",
        "",
    ]
    for name, model in m["models"].items():
        lines += _mqar_model(name, model)
    lines += _mqar_comparisons(m)
    return lines + ["![MQAR](mqar.png)", ""]


def _mqar_model(name: str, model: dict) -> list[str]:
    n, done = len(model["converged"]), sum(model["converged"])
    header = ["metric", *(f"d {b['lo']}-{b['hi'] - 1}" for b in model["bins"])]
    rows = [[metric, *(ci(b[metric], 2) for b in model["bins"])] for metric in ("orig", "both", "twin")]
    rows.append(["verdict", *(b["verdict"] for b in model["bins"])])
    rows.append(["queries (fewest per seed)", *(str(b["queries"]) for b in model["bins"])])
    return [
        f"**{name}** ({_describe(model['config'])}; reach {model['reach']}; {model['steps']} steps; plateaued "
        f"{done}/{n}; bins from {model['verdict_seeds']} seeds):",
        "",
        *table(header, rows),
    ]


def _mqar_comparisons(m: dict) -> list[str]:
    if not m["comparisons"]:
        return []
    first = m["comparisons"][0]["bins"]
    header = ["model - reference", "metric", *(f"d {b['lo']}-{b['hi'] - 1}" for b in first)]
    rows = []
    for c in m["comparisons"]:
        for metric in ("orig", "both"):
            rows.append(
                [
                    f"{c['model']} - {c['reference']}",
                    metric,
                    *(f"{ci(b[metric], 2, True)} {verdict(b[metric], 2)}" for b in c["bins"]),
                ]
            )
    return [
        "Paired differences per bin, over all seeds (plateaued or not, so that every pair is kept): each model "
        "minus full attention (rotary) at its depth, and the mixed stack minus the window stack:",
        "",
        *table(header, rows),
    ]


def _extrapolation(r: dict) -> list[str]:
    if "extrapolation" not in r:
        return ["## Length extrapolation", "", NOT_RUN, ""]
    e, T = r["extrapolation"], r["extrapolation"]["context"]
    lines = [
        "## Length extrapolation",
        "",
        f"Loss of every token of {r['config']['extrapolation']['stretches']} val stretches with a longer context "
        f"minus its loss with the context cut at multiples of the training length T = {T} (the 1x reference), on "
        "the same tokens, mean [95% interval] over seeds: below 0 the longer context helps, above 0 it hurts. "
        "pi<f>: zero-shot position interpolation to f x T; pi_finetuned: interpolation after a short fine-tune at "
        "that length.",
        "",
    ]
    rows = []
    for v, entry in e["variants"].items():
        for mode, value in entry.items():
            if mode in ("chunked_loss", "by_position_1x"):
                continue
            if isinstance(value, str):
                rows.append([v, mode, value, "", ""])
                continue
            rows.append(
                [
                    v,
                    f"{mode} ({value['length']} tokens)",
                    ci(value["loss"]),
                    _headline(value.get("near")),
                    _headline(value.get("far")),
                ]
            )
    lines += table(
        ["variant", "scored as", "mean loss", f"just past T ({T}-{3 * T // 2 - 1})", f"far past T ({2 * T}-)"], rows
    )
    for v, entry in e["variants"].items():
        lines += _extrapolation_bins(v, entry)
    return lines + ["![extrapolation](extrapolation.png)", ""]


def _headline(d: dict | None) -> str:
    return "n/a" if d is None else f"{ci(d, 3, True)} {verdict(d, 3)}"


def _extrapolation_bins(v: str, entry: dict) -> list[str]:
    modes = [(k, m) for k, m in entry.items() if isinstance(m, dict) and "bins" in m]
    if not modes:
        return []
    lines = []
    for edges in dict.fromkeys(tuple(m["edges"]) for _, m in modes):  # one table per set of bins, in order
        header = [f"{v}: minus 1x", *(f"{lo}-{hi - 1}" for lo, hi in itertools.pairwise(edges))]
        lines += table(
            header, [[k, *(ci(b, 3, True) for b in m["bins"])] for k, m in modes if tuple(m["edges"]) == edges]
        )
    return lines


def _uptraining(r: dict) -> list[str]:
    if "uptraining" not in r:
        return ["## GQA uptraining", "", NOT_RUN, ""]
    u = r["uptraining"]
    lines = [
        "## GQA uptraining",
        "",
        f"The rope (multi-head) runs converted to fewer key/value heads (mean-pooled or first head of each group), "
        f"uptrained for fractions of their {r['config']['run']['steps']} steps (AdamW restarted, fresh batches), "
        f"against the converted shape trained from scratch. Multi-head: {ci(u['mha'])}. A share of a gap closed "
        "is given only where the scratch model is detected worse than MHA: 100% = as good as MHA, 0% = as good as "
        "the scratch model, below 0 = worse than it; its interval is Fieller's for a ratio of paired means.",
        "",
    ]
    for t in u["targets"]:
        for name, ref in t["references"].items():
            lines.append(
                f"- {t['kv_heads']} key/value head(s) from scratch, {name.replace('_', ' ')}: {ci(ref['loss'])}; "
                f"minus MHA {ci(ref['vs_mha'], 4, True)}, {verdict(ref['vs_mha'])}"
            )
        lines.append("")
        refs = list(t["references"])
        header = [
            "kv heads",
            "method",
            "uptraining",
            "loss",
            "minus MHA",
            *(f"minus {n.replace('_', ' ')}" for n in refs),
            *(f"share of the {n.replace('_', ' ')} gap closed" for n in refs),
        ]
        rows = [
            [
                str(t["kv_heads"]),
                a["method"],
                f"{100 * a['fraction']:g}%",
                ci(a["loss"]),
                f"{ci(a['vs_mha'], 4, True)} {verdict(a['vs_mha'])}",
                *(f"{ci(a[f'vs_{n}'], 4, True)} {verdict(a[f'vs_{n}'])}" for n in refs),
                *(_share(a[f"closes_{n}_gap"]) for n in refs),
            ]
            for a in t["arms"]
        ]
        lines += table(header, rows)
        for c in t["conversion_gap_closed"]:
            gap = f"{num(c['gap'], 4, True)}: converted, not trained, minus MHA"
            closes = (
                f"no conversion gap detected to close ({gap})"
                if c["share"] is None
                else f"closes {_share(c['share'])} of the conversion gap ({gap})"
            )
            lines.append(f"- {c['method']}, {100 * c['fraction']:g}% uptraining: {closes}")
        lines.append("")
    return lines


def _share(d: dict | None) -> str:
    """A share of a gap closed, in percent, with its interval: ``46% [38%, 54%]``."""
    if d is None:
        return "no gap to close"
    if d["lo"] is None:
        return f"{100 * d['mean']:.0f}%"
    return f"{100 * d['mean']:.0f}% [{100 * d['lo']:.0f}%, {100 * d['hi']:.0f}%]"


def _overfitting(r: dict) -> list[str]:
    if "overfitting" not in r:
        return ["## Overfitting against n_kv_head", "", NOT_RUN, ""]
    o, cfg = r["overfitting"], r["config"]
    tokens, steps = cfg["overfitting"]["tokens"], cfg["overfitting"]["steps"]
    epochs = steps * cfg["data"]["batch_size"] * cfg["data"]["block_size"] / tokens
    rows = [
        [v, str(e["n_kv_head"]), ci(e["train_loss"]), ci(e["val_loss"]), ci(e["gap"])] for v, e in o["variants"].items()
    ]
    lines = [
        "## Overfitting against n_kv_head",
        "",
        f"{steps} steps on the first {tokens:,} training tokens ({epochs:.0f} epochs); train loss on all of those "
        "tokens, val loss on the fixed val tokens; gap = val - train.",
        "",
        *table(["variant", "kv heads", "train-set loss", "val loss", "gap"], rows),
    ]
    rows = [[f"{c['variant']} - {c['reference']}", ci(c["gap"], 4, True), verdict(c["gap"])] for c in o["comparisons"]]
    if rows:  # one variant alone has nothing to compare with
        lines += table(["gap difference", "mean [95%]", "verdict"], rows)
    return lines + ["![overfitting](overfitting.png)", ""]


def _efficiency(r: dict) -> list[str]:
    f = r["efficiency"]
    rows = [
        [
            str(d["batch"]),
            f"{d['context']:,}",
            d["variant"],
            ci(d["reference_tokens_per_s"], 0),
            ci(d["tokens_per_s"], 0),
            ratio(d["ratio"]),
            verdict(d["ratio"]),
        ]
        for d in f["decode"]
    ]
    lines = [
        "## Efficiency",
        "",
        f"Decode on {f['device']} ({f['dtype']}, random weights): tokens/s of greedy one-token steps with the KV "
        f"cache, each variant timed back to back with the reference ({f['reference']}) in every round; ratio = "
        "variant / reference, geometric mean over rounds [95% interval].",
        "",
        *table(["batch", "context", "variant", "reference tokens/s", "variant tokens/s", "ratio", "verdict"], rows),
    ]
    kernels = sorted({k for row in f["kernels"] for k in row["ms"]})
    window_kernels = [n for n in kernels if n != "full causal (SDPA)"]
    rows = [
        [
            f"{k['context']:,}",
            str(k["window"]),
            str(k["ratio"]),
            *(num(k["ms"].get(n), 2) for n in kernels),
            *(
                f"{ratio(k['vs_full'][n])} {verdict(k['vs_full'][n])}" if n in k["vs_full"] else ""
                for n in window_kernels
            ),
        ]
        for k in f["kernels"]
    ]
    lines += [
        "Attention kernels, forward, one sequence (median ms of interleaved rounds; time ratio window / full "
        "causal, below 1 = the window is faster):",
        "",
        *table(["T", "W", "T/W", *(f"{n} ms" for n in kernels), *(f"{n} / full" for n in window_kernels)], rows),
    ]
    kv = f["kv_cache"]
    rows = [
        [name, *("n/a" if b is None else f"{b / 2**20:,.3f}" for b in values)] for name, values in kv["bytes"].items()
    ]
    lines += [
        f"KV cache of one sequence, MiB ({kv['bytes_per_element']}-byte elements), computed:",
        "",
        *table(["variant", *(f"{c:,}" for c in kv["contexts"])], rows),
        "![efficiency](efficiency.png)",
        "",
    ]
    return lines


def _runs(r: dict) -> list[str]:
    return [
        "## Runs",
        "",
        "Every job's directory is `runs/<job>/` (its `job.json` holds the result this report "
        "reads, and training jobs their `metrics.jsonl`).",
        "",
    ]
