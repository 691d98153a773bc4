"""report.md: every number in it is read from results.json."""

from __future__ import annotations

from gpt2lab import settings

RESULTS, REPORT = "results.json", "report.md"
MIB = 2**20


def _parts(results: dict) -> tuple:
    """What the sections quote: config, variants, compare/run/data settings, context, seeds, command,
    tokens per run, data description, environment."""
    cfg, variants = results["config"], results["variants"]
    tokens = variants[next(iter(variants))]["runs"][0]["tokens"]
    command = f"`{results['command']}`"
    sections = cfg["compare"], cfg["run"], cfg["data"]
    return (
        cfg,
        variants,
        *sections,
        results["context"],
        results["seeds"],
        command,
        tokens,
        results["data"],
        results["environment"],
    )


def render_report(results: dict) -> str:
    """report.md: every number in it is read from ``results``."""
    sections = (_header, _setup, _quality, _inference, _extrapolation, _recall, _every_run)
    return "\n".join(line for section in sections for line in section(results))


def _header(results: dict) -> list[str]:
    """The title and where every number comes from."""
    cfg, variants, spec, run, data, T, seeds, command, tokens, source, env = _parts(results)
    return [
        "# Architectural variants compared",
        "",
        f"Produced by {command} in {results['runtime_s'] / 60:.1f} min on {env['device']} "
        f"(torch threads: {env['torch_threads']}, torch {env['torch']}). Every number below is read from "
        f"`{RESULTS}` beside this file, which holds the per-run values behind each mean; each run's "
        "`metrics.jsonl` (the training log the curves and speeds come from) is in `runs/<variant>/seed<seed>/`.",
        "",
    ]


def _setup(results: dict) -> list[str]:
    """What was compared and how it was trained."""
    cfg, variants, spec, run, data, T, seeds, command, tokens, source, env = _parts(results)
    return [
        "## Setup",
        "",
        "- Variants: " + "; ".join(f"**{n}** = {_describe(v)}" for n, v in variants.items()) + ".",
        f"- Model: {_arch(variants[next(iter(variants))]['model_config'])}.",
        f"- Training (identical for every variant): {run['steps']} steps of {data['batch_size']} x {T} tokens "
        f"({tokens:,} tokens per run), AdamW lr {cfg['optim']['lr']} -> {cfg['optim']['min_lr']} (cosine, "
        f"{cfg['optim']['warmup_steps']} warmup steps), weight decay {cfg['optim']['weight_decay']}, seeds "
        f"{', '.join(map(str, seeds))} (the seed sets the initial weights and the order of the batches).",
        f"- Data: `{source['source']}`"
        + (
            f", in a {spec['vocab']}-token compact vocabulary (256 bytes and the {spec['vocab'] - 256} most frequent "
            f"training tokens; the other {100 * source['val_spelled_fraction']:.1f}% of val GPT-2 tokens are spelled as "
            "bytes, losslessly); "
            f"{source['train_tokens']:,} train and {source['val_tokens']:,} val tokens"
            if spec["vocab"]
            else " (full GPT-2 vocabulary)"
        )
        + ".",
        "",
        "Configuration (defaults plus the command's options; `gpt2lab compare --help` explains each key):",
        "",
        "```toml",
        settings.to_toml(cfg),
        "```",
        "",
    ]


def _quality(results: dict) -> list[str]:
    """Final val loss, parameters, training speed and memory."""
    cfg, variants, spec, run, data, T, seeds, command, tokens, source, env = _parts(results)
    return [
        "## Quality and training cost",
        "",
        _table(
            ["variant", "parameters", "non-embedding", "final val loss", "train tokens/s", "peak train memory (MiB)"],
            [
                [
                    name,
                    f"{v['params']:,}",
                    f"{v['non_embedding_params']:,}",
                    fmt_stats(v["summary"]["final_val_loss"]),
                    fmt_stats(v["summary"]["tokens_per_s"], 0),
                    fmt_stats(v["summary"]["peak_memory_bytes"], 1, MIB),
                ]
                for name, v in variants.items()
            ],
        ),
        "",
        f"{command}; mean ± standard deviation over {len(seeds)} seeds. Val loss: the last evaluation of each "
        f"run (`val_loss` in its metrics.jsonl: {run['eval_batches']} x {data['batch_size']} fixed val sequences of "
        f"{T} tokens). Tokens/s: median over the logged intervals of a run after the first (evaluation time "
        "excluded). Peak memory: "
        + (
            "the CUDA allocator's peak during training above what was allocated before it."
            if "cpu" not in env["device"]
            else "rise of the process's peak resident set (VmHWM, reset before each run) during the whole "
            "training call: weights, gradients, AdamW state, activations, batches and allocator slack."
        )
        + f" Non-embedding parameters exclude the token and position tables. Load average at the end: "
        f"{_load(env)}: on a shared machine speeds carry that noise.",
        "",
        "![validation loss](loss_curves.png)",
        "",
    ]


def _inference(results: dict) -> list[str]:
    """KV-cache bytes and decode speed."""
    cfg, variants, spec, run, data, T, seeds, command, tokens, source, env = _parts(results)
    return [
        "## Inference memory and speed",
        "",
        _table(
            [
                "variant",
                f"KV bytes/token at {T}",
                f"KV cache at {spec['decode_context']} (MiB)",
                f"decode tokens/s at {spec['decode_context']}",
            ],
            [
                [
                    name,
                    fmt_value(v["decode"]["kv_bytes_per_token"], 0),
                    fmt_value(v["decode"]["cache_bytes"], 2, MIB),
                    fmt_value(v["decode"]["tokens_per_s"], 1),
                ]
                for name, v in variants.items()
            ],
        ),
        "",
        f"{command}; cache buffers as `setup_cache` allocates them for one sequence ({variants[next(iter(variants))]['decode']['dtype']}), "
        f"summed over layers (a window layer keeps only its {spec['window']} newest positions). Decode: greedy "
        f"generation through `gpt2lab.stream` with random weights, prompt of "
        f"{spec['decode_context'] - spec['decode_tokens']} tokens, the {spec['decode_tokens']} decode steps up to "
        f"{spec['decode_context']} tokens timed (prefill excluded); learned-position variants get a position table "
        "that long for this measurement only.",
        "",
        "![memory and speed](memory_speed.png)",
        "",
    ]


def _extrapolation(results: dict) -> list[str]:
    """Val loss at each context multiple."""
    cfg, variants, spec, run, data, T, seeds, command, tokens, source, env = _parts(results)
    return [
        "## Context extrapolation",
        "",
        _table(
            ["variant"] + [f"{f}x ({f * T} tokens)" for f in spec["extrapolation"]],
            [
                [name] + [_fmt_context(v["summary"]["context_loss"][f"{f}x"]) for f in spec["extrapolation"]]
                for name, v in variants.items()
            ],
        ),
        "",
        f"{command}; mean val loss over all positions of windows of each length, cut from the same "
        f"{spec['extrapolation_sequences']} val stretches of {max(spec['extrapolation']) * T} tokens, so every column "
        "scores the same tokens; only the context each token gets differs. Trained at "
        f"{T} tokens. Mean ± std over seeds.",
        "",
        "![extrapolation](extrapolation.png)",
        "",
    ]


def _recall(results: dict) -> list[str]:
    """Recall accuracy by distance."""
    cfg, variants, spec, run, data, T, seeds, command, tokens, source, env = _parts(results)
    return [
        "## Long-range recall",
        "",
        _table(
            ["variant"] + [f"d {lo}-{hi - 1}" for lo, hi in results["recall_bins"]],
            [[name] + [_fmt_acc(a) for a in v["summary"]["recall_accuracy"]] for name, v in variants.items()]
            + [["key ignored (reference)"] + [fmt_value(r, 2) for r in results["recall_reference"] or []]],
        ),
        "",
        f"{command}; {_recall_text(results)}",
        "",
        "![recall](recall.png)",
        "",
    ]


def _every_run(results: dict) -> list[str]:
    """One row per training run."""
    cfg, variants, spec, run, data, T, seeds, command, tokens, source, env = _parts(results)
    return [
        "## Every run",
        "",
        _table(
            [
                "variant",
                "seed",
                "final val loss",
                "train tokens/s",
                "peak train memory (MiB)",
                "train wall s",
                "mean recall",
            ],
            [
                [
                    name,
                    str(r["seed"]),
                    fmt_value(r["final_val_loss"]),
                    fmt_value(r["tokens_per_s"], 0),
                    fmt_value(r["peak_memory_bytes"], 1, MIB),
                    fmt_value(r["wall_s"], 1),
                    fmt_value(_recall_mean(r["recall"]), 3) if "recall" in r else "not run",
                ]
                for name, v in variants.items()
                for r in v["runs"]
            ],
        ),
        "",
        f"{command}; one row per training run (its directory: `runs/<variant>/seed<seed>`).",
        "",
    ]


def fmt_stats(stats: dict | None, digits: int = 4, scale: float = 1.0) -> str:
    """``mean ± std`` of a measurement over seeds (``n/a`` when it could not be measured)."""
    if stats is None:
        return "n/a"
    return f"{stats['mean'] / scale:.{digits}f} ± {stats['std'] / scale:.{digits}f}"


def fmt_value(value, digits: int = 4, scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value / scale:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _describe(variant: dict) -> str:
    if not variant["changes"]:
        return "GPT-2 (learned positions, multi-head, full attention)"
    return ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in variant["overrides"].items())


def _arch(c: dict) -> str:
    return (
        f"{c['n_layer']} layers, {c['n_head']} heads of {c['n_embd'] // c['n_head']}, width {c['n_embd']}, "
        f"{c['block_size']} positions, vocabulary {c['vocab_size']}"
    )


def _fmt_context(value) -> str:
    return value if isinstance(value, str) else fmt_stats(value)


def _fmt_acc(stats: dict | None) -> str:
    if stats is None:
        return "n/a"
    return f"{stats['mean']:.2f} ({stats['min']:.2f}-{stats['max']:.2f})"


def _recall_mean(recall: dict) -> float:
    """A run's recall accuracy over all its answered queries (bins weighted by their query counts)."""
    pairs = [(a, n) for a, n in zip(recall["accuracy"], recall["queries"], strict=True) if n]
    return sum(a * n for a, n in pairs) / sum(n for _, n in pairs)


def _load(env: dict) -> str:
    load = env.get("load_average")
    return ", ".join(f"{x:.1f}" for x in load) + f" on {env['cpu_count']} cores" if load else "unknown"


def _recall_text(results: dict) -> str:
    spec, task, T = results["config"]["compare"], results["recall_task"], results["context"]
    n_layer = next(iter(results["variants"].values()))["model_config"]["n_layer"]
    seeds = ", ".join(map(str, results["seeds"][: spec["recall_seeds"]]))
    W = spec["window"]
    return (
        "exact-match accuracy (argmax over the whole vocabulary) of the queries whose key's pair lies d tokens "
        f"back, mean (min-max) over the recall runs (seed {seeds}), on the same {spec['recall_sequences']} evaluation "
        "sequences for every model. Task (`gpt2lab.recall`): sequences of "
        f'{T} tokens in which {task["n_pairs"]} pair tokens "key k holds value v" ({task["n_keys"]} keys, '
        f"{task['n_values']} values) are planted at random positions and every other position asks for the value of "
        "a key planted before it. The reference row is the accuracy of ignoring the key and naming one of the "
        "planted values at random; above it, the model looks the key up. Each variant's trained language model "
        f"(same seed) is trained further on the task, {spec['recall_steps']} steps of {spec['recall_batch_size']} "
        f"sequences (AdamW as above, peak lr {spec['recall_lr']}; the task's tokens are the first ids of the LM's vocabulary). Why a "
        "dedicated run: it measures what each attention pattern can reach, not how a mixing ratio trades against "
        "language modelling, and the LM runs are far too short to pick the skill up on the side. Why start from "
        "the LM: from random weights the task sat on a plateau for 300-600 steps at this size when this was built "
        "(the attention must first learn to look anywhere in particular), which a 2-core CPU cannot pay for "
        f"every variant; the LM-trained attention starts learning it within ~150 steps. A window of {W} reaches "
        f"d < {W} in one attention step; through {n_layer} stacked window layers information can travel at most "
        f"{n_layer} x {W - 1} = {n_layer * (W - 1)} tokens."
    )
