"""What each variant costs in parameters and KV-cache memory, computed from the configs themselves.

``python tools/costs.py`` prints the tables of docs/architecture.md; ``--write docs/architecture.md``
replaces them there (between the ``costs:begin`` / ``costs:end`` markers). Parameters are counted on
the meta device, so even gpt2-xl costs no memory or time; cache bytes come from
``GPTConfig.kv_cache_bytes``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import re
import sys
from pathlib import Path

import torch

from gpt2lab.config import GPTConfig, divisors
from gpt2lab.model import GPT

PRESET_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
WINDOW = 1024
CONTEXTS = (1024, 8192, 32768)
BEGIN, END = "<!-- costs:begin -->", "<!-- costs:end -->"


def param_count(config: GPTConfig) -> int:
    """Parameters of the model (the tied lm_head counted once), without allocating any."""
    with torch.device("meta"):
        return GPT(config).num_params()


def gqa_heads(n_head: int) -> int:
    """A typical GQA group count for a preset: the largest divisor of n_head that is at most n_head / 4."""
    return max(d for d in divisors(n_head) if d <= n_head // 4)


def variants(name: str) -> dict[str, GPTConfig]:
    """The configs compared for one preset, by row label."""
    base = GPTConfig.from_name(name)
    kv = gqa_heads(base.n_head)
    local = dict(window=WINDOW)
    return {
        f"MHA ({base.n_head} kv heads)": base,
        f"GQA ({kv} kv heads)": dataclasses.replace(base, n_kv_head=kv),
        "MQA (1 kv head)": dataclasses.replace(base, n_kv_head=1),
        f"window {WINDOW}, every layer": dataclasses.replace(base, **local),
        f"window {WINDOW}, LLLLLG": dataclasses.replace(base, **local, window_pattern="LLLLLG"),
        f"window {WINDOW} + GQA {kv}": dataclasses.replace(base, **local, n_kv_head=kv),
    }


def _table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> str:
    align = ["---"] * text_columns + ["---:"] * (len(header) - text_columns)
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, align, *rows])


def _kib(n: int) -> str:
    return f"{n / 1024:,.0f}" if n % 1024 == 0 else f"{n / 1024:,.1f}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


@functools.cache  # a pure function of the code: compute once per process
def tables() -> str:
    """The three markdown tables of docs/architecture.md."""
    params, per_token, context = [], [], []
    for name in PRESET_NAMES:
        base = GPTConfig.from_name(name)
        kv = gqa_heads(base.n_head)
        rope = dataclasses.replace(base, pos_emb="rope")
        gqa, mqa = dataclasses.replace(base, n_kv_head=kv), dataclasses.replace(base, n_kv_head=1)
        params.append(
            [name, str(base.n_layer), str(base.n_head), str(base.n_embd)]
            + [f"{param_count(c):,}" for c in (base, rope)]
            + [str(kv)]
            + [f"{param_count(c):,}" for c in (gqa, mqa)]
        )
        per_token.append([name] + [_kib(c.kv_cache_bytes_per_token(b)) for c in (base, gqa, mqa) for b in (2, 4)])
        for label, config in variants(name).items():
            context.append([name, label] + [_mib(config.kv_cache_bytes(n, b)) for b in (2, 4) for n in CONTEXTS])
    k = [f"{n // 1024}k" for n in CONTEXTS]
    return "\n\n".join(
        [
            "Parameters (a window changes no parameter; RoPE drops the learned position table):",
            _table(["preset", "layers", "heads", "n_embd", "GPT-2", "RoPE", "GQA kv heads", "GQA", "MQA"], params),
            "KV cache per token, all layers, KiB (grows with the context for full-attention layers):",
            _table(
                ["preset", "MHA bf16/fp16", "MHA fp32", "GQA bf16/fp16", "GQA fp32", "MQA bf16/fp16", "MQA fp32"],
                per_token,
            ),
            f"KV cache of one sequence, MiB, at {', '.join(k)} tokens of context "
            f"(window layers keep at most {WINDOW} tokens):",
            _table(["preset", "variant"] + [f"{n} bf16" for n in k] + [f"{n} fp32" for n in k], context, 2),
        ]
    )


def replace_tables(doc: str, text: str) -> str:
    """``doc`` with the block between the markers replaced by ``text``."""
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(doc):
        raise ValueError(f"the document has no {BEGIN} ... {END} block")
    return pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/costs.py", description=__doc__.splitlines()[0])
    parser.add_argument("--write", metavar="DOC.md", help="replace the tables in this document instead of printing")
    args = parser.parse_args(argv)
    text = tables()
    if args.write is None:
        print(text)
        return 0
    path = Path(args.write)
    path.write_text(replace_tables(path.read_text(), text))
    print(f"updated the tables in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
