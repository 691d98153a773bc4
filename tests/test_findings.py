"""docs/findings.md quotes only measured numbers: every number in it appears in the committed comparison,
docs/compare/results.json or docs/compare/report.md.

What the check exempts, because it is not a measurement of ours: the assignment's claims quoted in blockquotes
(lines starting with ``>``), literature figures in footnote definitions (``[^name]: Press et al., 2022, ...``),
commands and code in backticks, link targets, and claim numbers (``claim 3``). A number matches if the report
prints it as written (signs, thousands separators and a trailing ``%`` or ``x`` ignored), or if a value in
results.json rounds to it at the number of decimals written (as a share, ``12%`` also matches 0.12; a magnitude
also matches a negative value: "lower by 0.06")."""

from __future__ import annotations

import json
import re
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
NUMBER = re.compile(r"(?<![\w.])[-+\u2212]?\d[\d,]*(?:\.\d+)?(?![\d])")


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


def _plain(token: str) -> str:
    return token.replace(",", "").replace("\u2212", "-").lstrip("+-")


def _values(obj) -> np.ndarray:
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
            out.extend(float(_plain(t)) for t in numbers(x))

    walk(obj)
    return np.abs(np.asarray(out, dtype=float))


def unmatched(findings: str, results: dict, report: str) -> list[str]:
    """The numbers of ``findings`` that neither the report prints nor results.json holds."""
    printed = {_plain(t) for t in numbers(report)}
    values = _values(results)
    missing = []
    for token in numbers(measured_text(findings)):
        plain = _plain(token)
        if plain in printed:
            continue
        decimals = len(plain.split(".")[1]) if "." in plain else 0
        x = float(plain)
        if np.any(np.round(values, decimals) == x) or np.any(np.round(100 * values, decimals) == x):
            continue
        missing.append(token)
    return missing


def test_every_number_in_the_findings_is_measured():
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if results.get("schema") != SCHEMA:
        pytest.skip(
            f"docs/compare/results.json is not a {SCHEMA} run yet (the run and the findings are committed together)"
        )
    missing = unmatched(FINDINGS.read_text(), results, REPORT.read_text())
    assert not missing, f"numbers in docs/findings.md found in neither results.json nor report.md: {missing}"


def test_the_matching_rules():
    results = {"a": -0.06171, "b": [1234, 0.125], "c": "error: sequence of 2048 tokens exceeds block_size 256"}
    report = "| x | 1.52x [1.10, 1.91] | 12% |"
    findings = (
        "> Claim text with 99 bottles, quoted.\n"
        "The window is lower by 0.062 (-0.0617 exactly), 1,234 tokens, 12.5% of them, 1.52x faster, "
        "`gpt2lab compare --steps 7`, [a link](https://x.org/2023), claim 11, 2048 and 256 positions.[^p]\n"
        "[^p]: Press et al., 2022: +100 to 200 tokens.\n"
    )
    assert unmatched(findings, results, report) == []
    assert unmatched("off by 0.0618 and 17 runs", results, report) == ["0.0618", "17"]
