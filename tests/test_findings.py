"""docs/findings.md quotes only measured numbers, and quotes each headline result with the sign, verdict and †
that the committed comparison (docs/compare/results.json, report.md, runs/*/job.json) gives it.

Two checks. The general one: every number in the findings is measured. What it exempts, because it is not a
measurement of ours: the assignment's claims quoted in blockquotes (lines starting with ``>``), literature
figures in footnote definitions (``[^name]: Press et al., 2022, ...``), commands and code in backticks, link
targets, and claim numbers (``claim 3``). A number matches if the report prints it as written, or if a value in
results.json (or a per-seed recall fraction of an MQAR run) rounds to it at the number of decimals written (as
a share, ``12%`` also matches 0.12). Signs count: ``-0.06`` matches only a negative value, ``+0.06`` only a
positive one; a number written without a sign is a magnitude and matches either ("lower by 0.06"). Thousands
separators and a trailing ``%`` or ``x`` are ignored.

The specific one (``QUOTES``): for each headline result the findings rest on, the findings must print its mean
[lo, hi] as the report formats it, and every printed interval must be followed, in its clause, by the result's
verdict, with † exactly when it survives Holm's correction (and its MDD80 where no difference was detected).
Where the mean alone is quoted with a verdict right after it, that verdict and † must be the result's too."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from gpt2lab.compare.analysis import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
FINDINGS, RESULTS, REPORT = (
    ROOT / "docs/findings.md",
    ROOT / "docs/compare/results.json",
    ROOT / "docs/compare/report.md",
)
MQAR_RUNS = ROOT / "docs/compare/runs/mqar"
NUMBER = re.compile(r"(?<![\w.])[-+\u2212]?\d[\d,]*(?:\.\d+)?(?![\d])")


@cache
def results() -> dict:
    loaded = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if loaded.get("schema") != SCHEMA:
        pytest.skip(
            f"docs/compare/results.json is not a {SCHEMA} run yet (the run and the findings are committed together)"
        )
    return loaded


def findings() -> str:
    return FINDINGS.read_text()


# --- every number is measured, with its sign -----------------------------------------------------


def measured_text(markdown: str) -> str:
    """The parts of ``markdown`` whose numbers must be measurements (see the module docstring)."""
    text = re.sub(r"```.*?```", " ", markdown, flags=re.S)
    lines = [
        line
        for line in text.splitlines()
        if not line.lstrip().startswith(">") and not re.match(r"\s*\[\^[^\]]+\]:", line)
    ]
    text = "\n".join(lines)
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)  # link targets
    text = re.sub(r"\[\^[^\]]+\]", " ", text)  # footnote references
    return re.sub(r"(?i)\bclaims? \d+(?:\s*(?:-|–|and|,)\s*\d+)*", " ", text)


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def _signed(token: str) -> tuple[str, str]:
    """(sign, magnitude) of a number as written: sign is "-", "+" or "" (none written)."""
    token = token.replace(",", "").replace("\u2212", "-")
    return (token[0], token[1:]) if token[0] in "+-" else ("", token)


def _values(obj) -> np.ndarray:
    """Every number in ``obj`` (a results.json tree), signed; numbers inside strings too."""
    out: list[float] = []

    def walk(x) -> None:
        if isinstance(x, bool) or x is None:
            return
        if isinstance(x, (int, float)):
            out.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, str):
            out.extend(float("".join(_signed(t))) for t in numbers(x))

    walk(obj)
    return np.asarray(out, dtype=float)


def unmatched(findings: str, results: dict, report: str, extra: tuple[float, ...] = ()) -> list[str]:
    """The numbers of ``findings`` that neither the report prints nor results.json (or ``extra``) holds,
    with their signs (see the module docstring)."""
    printed = {_signed(t) for t in numbers(report)}
    printed |= {("+", magnitude) for sign, magnitude in printed if sign == ""}  # unsigned in the report: >= 0
    values = np.concatenate([_values(results), np.asarray(extra, dtype=float)])
    missing = []
    for token in numbers(measured_text(findings)):
        sign, magnitude = _signed(token)
        if (sign and (sign, magnitude) in printed) or (not sign and any(m == magnitude for _, m in printed)):
            continue
        decimals = len(magnitude.split(".")[1]) if "." in magnitude else 0
        x = float(sign + magnitude)
        candidates = values if sign else np.abs(values)
        if np.any(np.round(candidates, decimals) == x) or np.any(np.round(100 * candidates, decimals) == x):
            continue
        missing.append(token)
    return missing


# --- per-seed recall, from the MQAR runs ---------------------------------------------------------


@cache
def recall_bins(model: str, seed: int) -> dict[str, list[float]]:
    """One MQAR run's fraction right per distance bin (the bins of results.json), for "orig" and "both"."""
    edges = results()["mqar"]["edges"]
    ev = json.loads((MQAR_RUNS / model / f"seed{seed}" / "job.json").read_text())["value"]["eval"]
    n = np.asarray(ev["n"])
    return {
        metric: [
            float(np.sum(ev[metric][lo:hi]) / n[lo:hi].sum()) for lo, hi in zip(edges[:-1], edges[1:], strict=True)
        ]
        for metric in ("orig", "both")
    }


def all_recall_bins() -> list[float]:
    r = results()
    return [
        x
        for model in r["mqar"]["models"]
        for seed in r["seeds"]
        for per_bin in recall_bins(model, seed).values()
        for x in per_bin
    ]


def test_every_number_in_the_findings_is_measured():
    missing = unmatched(findings(), results(), REPORT.read_text(), tuple(all_recall_bins()))
    assert not missing, f"numbers in docs/findings.md found in neither results.json nor report.md: {missing}"


def test_the_matching_rules():
    results = {"a": -0.06171, "b": [1234, 0.125], "c": "error: sequence of 2048 tokens exceeds block_size 256"}
    report = "| x | 1.52x [1.10, 1.91] | 12% | -0.50 [-0.70, -0.30] |"
    findings = (
        "> Claim text with 99 bottles, quoted.\n"
        "The window is lower by 0.062 (-0.0617 exactly), 1,234 tokens, 12.5% of them, 1.52x faster, -0.50, 0.70, "
        "`gpt2lab compare --steps 7`, [a link](https://x.org/2023), claim 11, 2048 and 256 positions.[^p]\n"
        "[^p]: Press et al., 2022: +100 to 200 tokens.\n"
    )
    assert unmatched(findings, results, report) == []
    assert unmatched("off by 0.0618 and 17 runs", results, report) == ["0.0618", "17"]
    # signs count where they are written: a flipped one is not measured
    assert unmatched("+0.0617, +0.50 [+0.70, −0.30], −1.52x", results, report) == ["+0.0617", "+0.50", "+0.70", "−1.52"]
    assert unmatched("0.42 by hand", results, report, extra=(0.4213,)) == []


# --- the headline results: mean [lo, hi], verdict and † -----------------------------------------


@dataclass(frozen=True)
class Quote:
    """A result in results.json (``path``: keys, list indices, or {key: value} picking the list item that
    matches) quoted by the findings as the report prints it: a signed difference at ``digits`` decimals, an
    accuracy (unsigned), or a speed ratio ("1.16x [1.06, 1.26]"). ``verdict_at``: where the verdict is, when
    not beside the interval (MQAR's per-bin verdict)."""

    path: tuple
    digits: int = 4
    kind: str = "difference"  # or "accuracy", "ratio"
    verdict_at: tuple | None = None

    def number(self, x: float) -> str:
        if self.kind == "difference":
            return f"{x:+.{self.digits}f}"
        return f"{x:.{self.digits}f}"

    def mean(self, node: dict) -> str:
        return self.number(node["mean"]) + ("x" if self.kind == "ratio" else "")

    def interval(self, node: dict) -> str:
        return f"{self.mean(node)} [{self.number(node['lo'])}, {self.number(node['hi'])}]"

    def any_signs(self, node: dict) -> str:
        """A pattern for the interval with any signs, and its bounds in either order."""
        mean, lo, hi = (rf"[+\-]?{abs(node[k]):.{self.digits}f}" for k in ("mean", "lo", "hi"))
        unit = "x" if self.kind == "ratio" else ""
        return rf"(?<![\d.]){mean}{unit} \[(?:{lo}, {hi}|{hi}, {lo})\]"

    def mdd80(self, node: dict) -> str | None:
        if self.kind == "ratio":
            return f"{node['mdd80_factor']:.2f}x" if node.get("mdd80_factor") else None
        return f"{node['mdd80']:.{self.digits}f}" if node.get("mdd80") is not None else None


LM, OVERFIT = ("lm", "comparisons"), ("overfitting", "comparisons")
UPTRAIN = ("uptraining", "targets", {"kv_heads": 1})
EXTRAP, MQAR = ("extrapolation", "variants"), ("mqar", "comparisons")
DECODE = ("efficiency", "decode")
L1_SWA_8 = ("mqar", "models", "L1/rope+swa", "bins", {"lo": 8})

QUOTES = [
    # claims 2-5, 9, 12: the language models at 300 steps
    Quote((*LM, {"variant": "rope"}, "final")),
    Quote((*LM, {"variant": "rope+mqa"}, "final")),
    Quote((*LM, {"variant": "rope+swa"}, "final")),
    Quote((*LM, {"variant": "rope+mixed"}, "final")),
    # claim 8: overfitting gaps
    Quote((*OVERFIT, {"variant": "rope+gqa"}, "gap")),
    Quote((*OVERFIT, {"variant": "rope+mqa"}, "gap")),
    # claims 5 and 7: uptraining
    Quote((*UPTRAIN, "arms", {"method": "mean", "fraction": 0.0}, "vs_mha")),
    Quote((*UPTRAIN, "arms", {"method": "first", "fraction": 0.0}, "vs_mha")),
    Quote((*UPTRAIN, "arms", {"method": "mean", "fraction": 0.1}, "vs_mha")),
    Quote((*UPTRAIN, "arms", {"method": "mean", "fraction": 0.1}, "vs_scratch_same_steps")),
    Quote((*UPTRAIN, "references", "scratch_same_compute", "vs_mha")),
    # claims 2, 4 and 10: extrapolation headlines (near: 256-383, far: 512-) and the position bins quoted
    Quote((*EXTRAP, "rope", "full", "far"), 3),
    Quote((*EXTRAP, "rope", "full", "bins", 2), 3),  # 256-319
    Quote((*EXTRAP, "rope", "pi4", "near"), 3),
    Quote((*EXTRAP, "rope", "pi_finetuned", "near"), 3),
    Quote((*EXTRAP, "rope+swa", "full", "near"), 3),
    Quote((*EXTRAP, "rope+swa", "full", "far"), 3),
    Quote((*EXTRAP, "rope+mixed", "full", "near"), 3),
    Quote((*EXTRAP, "rope+mixed", "full", "far"), 3),
    Quote((*EXTRAP, "rope+mixed", "full", "bins", 4), 3),  # 384-511
    Quote((*EXTRAP, "rope+mixed", "full", "bins", 5), 3),  # 512-767
    Quote((*EXTRAP, "rope+mixed", "full", "bins", 6), 3),  # 768-1023
    # claims 11 and 12: recall at and past the window
    Quote((*L1_SWA_8, "orig"), 2, "accuracy", verdict_at=(*L1_SWA_8, "verdict")),
    Quote((*MQAR, {"model": "L1/rope+swa", "reference": "L1/rope"}, "bins", {"lo": 8}, "orig"), 2),
    Quote((*MQAR, {"model": "L2/rope+mixed", "reference": "L2/rope+swa"}, "bins", {"lo": 15}, "orig"), 2),
    Quote((*MQAR, {"model": "L2/rope+mixed", "reference": "L2/rope+swa"}, "bins", {"lo": 32}, "orig"), 2),
    # claims 1, 5, 6, 9 and 12: decode and attention-kernel speed ratios
    *(
        Quote((*DECODE, {"batch": b, "context": c, "variant": v}, "ratio"), 2, "ratio")
        for b, c, v in [
            (1, 256, "baseline"),
            (8, 256, "baseline"),
            (1, 256, "rope+mqa"),
            (1, 1024, "rope+mqa"),
            (1, 4096, "rope+mqa"),
            (8, 256, "rope+mqa"),
            (8, 1024, "rope+mqa"),
            (8, 4096, "rope+mqa"),
            (1, 256, "rope+swa"),
            (1, 4096, "rope+swa"),
            (8, 1024, "rope+swa"),
            (8, 4096, "rope+swa"),
        ]
    ),
    Quote(("efficiency", "kernels", {"context": 4096, "window": 1024}, "vs_full", "window: SDPA + mask"), 2, "ratio"),
]

VERDICT = re.compile(
    r"\b(no difference detected|not above chance|untested|better|worse|helps|hurts|faster|slower)\b(\s*†)?"
)


def at(tree, path: tuple):
    for key in path:
        if isinstance(key, dict):
            (tree,) = [item for item in tree if all(item.get(k) == v for k, v in key.items())]
        else:
            tree = tree[key]
    return tree


def flat(markdown: str) -> str:
    """The findings as one line, with ASCII minus signs, as the report prints numbers."""
    return " ".join(markdown.replace("\u2212", "-").split())


def clause(text: str, start: int) -> str:
    """``text`` from ``start`` to the end of its clause: a semicolon, a sentence's end or a table cell's."""
    end = re.search(r";|\||\.\s|$", text[start:])
    return text[start : start + end.start()]


def verdict_of(node: dict, quote: Quote) -> tuple[str, bool]:
    verdict = at(results(), quote.verdict_at) if quote.verdict_at else node["verdict"]
    return ("untested" if "untested" in verdict else verdict), bool(node.get("holm"))


def quote_errors(text: str, quote: Quote) -> list[str]:
    """What is wrong with how ``text`` (flattened findings) quotes the result at ``quote.path``."""
    node = at(results(), quote.path)
    verdict, holm = verdict_of(node, quote)
    expected = f"{verdict}{' †' if holm else ''}"
    interval, mean = quote.interval(node), quote.mean(node)
    errors, quoted = [], 0
    for m in re.finditer(quote.any_signs(node), text):
        if m[0] != interval:
            errors.append(f"{m[0]} misquotes {interval}")
    spans = [m.span() for m in re.finditer(re.escape(interval), text)]
    for _, end in spans:
        tail = clause(text, end)
        said = said_verdict(tail)
        quoted += said == expected
        if said != expected:
            errors.append(f"{interval} is followed by {said!r}, not {expected!r}")
        mdd80 = quote.mdd80(node)
        if verdict == "no difference detected" and mdd80 and mdd80 not in tail.partition("MDD80")[2]:
            errors.append(f"{interval}: no MDD80 {mdd80} in {tail!r}")
    # the mean alone (not a bound in brackets), with a verdict right after it: within a few words, before any
    # other number; written with the other sign, it misquotes the result
    rest = re.sub(r"\[[^\]]*\]", lambda m: "[" + " " * (len(m[0]) - 2) + "]", text)
    for m in re.finditer(rf"(?<![\d.+\-])[+\-]?{re.escape(mean.lstrip('+-'))}(?![\d])", rest):
        said = said_verdict(re.split(r"[\d;\[|]", rest[m.end() : m.end() + 25])[0])
        if said == "no verdict":
            continue
        quoted += m[0] == mean and said == expected
        if m[0] != mean or said != expected:
            errors.append(f"{m[0]} is followed by {said!r}: {mean} is {expected!r}")
    if not quoted:
        errors.append(f"{interval} ({expected}) is not quoted with its verdict")
    return errors


def said_verdict(tail: str) -> str:
    """The first verdict in ``tail``, with its † if it has one."""
    found = VERDICT.search(tail)
    return f"{found[1]}{' †' if found[2] else ''}" if found else "no verdict"


def _id(quote: Quote) -> str:
    return "/".join(str(v) for key in quote.path for v in (key.values() if isinstance(key, dict) else [key]))


@pytest.mark.parametrize("quote", QUOTES, ids=_id)
def test_headline_results_are_quoted_with_their_sign_verdict_and_dagger(quote):
    assert not quote_errors(flat(findings()), quote)


def test_the_quote_rules():
    quote = Quote((*LM, {"variant": "rope+swa"}, "final"))
    right = "rope+swa - rope -0.0567 [-0.0754, -0.0381], better (no Holm) ... (-0.0567, better)"
    assert quote_errors(right, quote) == []
    for wrong in (
        right.replace("-0.0567 [", "+0.0567 ["),  # sign flipped: not quoted at all
        right.replace("better (no", "worse (no"),
        right.replace("better (no", "better † (no"),
        right.replace("(-0.0567, better)", "(-0.0567, better †)"),
        right.replace("(-0.0567, better)", "(+0.0567, better)"),  # the mean alone, sign flipped
        right.replace("], better (no Holm)", "] (no Holm)"),  # an interval without its verdict
    ):
        assert quote_errors(wrong, quote), wrong
    far = Quote((*EXTRAP, "rope+mixed", "full", "far"), 3)
    assert quote_errors("+0.005 [-0.007, +0.017], no difference detected, MDD80 0.016", far) == []
    assert quote_errors("+0.005 [-0.007, +0.017], no difference detected", far)  # MDD80 left out


# --- statements that are not a single result ------------------------------------------------------


def test_counts_and_shares_the_findings_state():
    r, text = results(), flat(findings())
    assert f"over all {r['holm_family']} tested verdicts of the report" in text
    runs = [c for m in r["mqar"]["models"].values() for c in m["converged"]]
    assert f"{runs.count(False)} of the {len(runs)} runs had not reached a plateau" in text
    closed = {
        (c["method"], c["fraction"]): "{:.0f}% [{:.0f}%, {:.0f}%]".format(
            *(100 * c["share"][k] for k in ("mean", "lo", "hi"))
        )
        for c in at(r, UPTRAIN)["conversion_gap_closed"]
    }
    assert f"closes {closed['mean', 0.05]} and {closed['mean', 0.1]} of that gap" in text
    assert f"then {closed['first', 0.05]} and {closed['first', 0.1]})" in text


def test_per_seed_recall_figures():
    """Claims 3, 6 and 11 describe single MQAR runs; the figures come from their job.json."""
    r, text = results(), flat(findings())

    def span(model: str, seed: int, metric: str) -> str:
        per_bin = recall_bins(model, seed)[metric]
        return f"{min(per_bin):.2f}-{max(per_bin):.2f}"

    perfect = {m: [s for s in r["seeds"] if min(recall_bins(m, s)["both"]) == 1.0] for m in r["mqar"]["models"]}
    assert perfect["L1/rope"] == perfect["L1/baseline"] == r["seeds"]  # claim 3: every query, every seed
    (odd,) = set(r["seeds"]) - set(perfect["L1/rope+mqa"])  # claim 6: four MQA seeds perfect, one not
    assert f"four MQA models answer every query, the fifth (seed {odd}) " in text
    assert f"{span('L1/rope+mqa', odd, 'orig')} per distance bin on the original and " in text
    assert f"{span('L1/rope+mqa', odd, 'both')} on both copies" in text
    # claim 11: the mixed stacks that learned the lookup, and the two that stalled
    final = [curve[-1][1] for curve in r["mqar"]["models"]["L2/rope+mixed"]["curves"]]
    learned = [s for s, acc in zip(r["seeds"], final, strict=True) if acc > 0.9]
    stalled = sorted(acc for acc in final if acc <= 0.9)
    assert len(learned) == 3 and len(stalled) == 2
    *first, last = [f"{acc:.3f}" for acc in final if acc > 0.9]
    assert f"(in-reach accuracy {', '.join(first)} and {last} at " in text
    weakest = min(learned, key=lambda s: min(recall_bins("L2/rope+mixed", s)["both"]))
    assert f"the weakest (seed {weakest}) at {span('L2/rope+mixed', weakest, 'orig')} per distance bin" in text
    assert f"and {span('L2/rope+mixed', weakest, 'both')} on both copies" in text
    assert f"(in-reach accuracy {stalled[0]:.2f} and {stalled[1]:.2f})" in text
