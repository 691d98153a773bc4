"""gpt2lab compare: the recall task generator, configuration, measurements, and one end-to-end run of
the whole machinery on a tiny configuration whose report numbers are traced back to the runs."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.cli import main
from gpt2lab.compare import compare
from gpt2lab.compare.measure import PeakMemory
from gpt2lab.compare.plots import PLOTS
from gpt2lab.compare.recall import IGNORE, RecallTask, distance_bins, recall_batch
from gpt2lab.compare.report import REPORT, RESULTS, fmt_stats, fmt_value
from gpt2lab.compare.settings import load_config, variant_changes, variant_overrides
from gpt2lab.data import Source, TokenData, compact_vocabulary, prepare
from gpt2lab.errors import ConfigError
from gpt2lab.eval import context_losses
from gpt2lab.tokenizer import CompactTokenizer, load_tokenizer

# --- the recall task -------------------------------------------------------------------------------


@pytest.mark.parametrize("seq_len", [16, 64])
def test_recall_answer_lies_exactly_at_the_stated_distance(seq_len):
    task = RecallTask(n_keys=8, n_values=5, n_pairs=4)
    batch = recall_batch(task, seq_len, 64, np.random.default_rng(seq_len))
    n_pairs, n_keys, n_values = task.n_pairs, task.n_keys, task.n_values
    answered = 0
    for row in range(64):
        x, y, dist = batch.x[row].tolist(), batch.y[row].tolist(), batch.distance[row].tolist()
        pairs = {i: divmod(t, n_values) for i, t in enumerate(x) if t < n_keys * n_values}  # pos -> (key, value)
        assert len(pairs) == n_pairs and len({k for k, _ in pairs.values()}) == n_pairs  # distinct keys
        for i, t in enumerate(x):
            if i in pairs:
                assert y[i] == IGNORE and dist[i] == -1
                continue
            key = t - task.query(0)
            assert 0 <= key < n_keys
            before = [(p, v) for p, (k, v) in pairs.items() if k == key and p < i]
            assert batch.visible[row, i] == sum(p < i for p in pairs)
            if batch.visible[row, i] == 0:  # no pair yet: the query is not scored
                assert y[i] == IGNORE and dist[i] == -1
            else:
                # the asked key was planted exactly dist[i] tokens back, only there, with the answer's value
                assert before == [(i - dist[i], y[i] - task.answer(0))]
                assert x[i - dist[i]] == task.pair(key, y[i] - task.answer(0))
                answered += 1
    assert answered > 64 * (seq_len - 2 * n_pairs) // 2


def test_recall_distances_cover_the_whole_context():
    task = RecallTask()
    batch = recall_batch(task, 128, 256, np.random.default_rng(0))
    d = batch.distance[batch.distance > 0]
    for lo, hi in distance_bins(16, 128):
        assert ((d >= lo) & (d < hi)).sum() > 50, (lo, hi)
    assert distance_bins(16, 128) == [(1, 8), (8, 16), (16, 32), (32, 48), (48, 64), (64, 96), (96, 128)]
    assert distance_bins(None, 64) == [(1, 8), (8, 16), (16, 32), (32, 48), (48, 64)]


def test_recall_rejects_impossible_settings():
    with pytest.raises(ConfigError, match="n_pairs"):
        RecallTask(n_keys=2, n_pairs=3)
    with pytest.raises(ConfigError, match="cannot hold"):
        recall_batch(RecallTask(n_pairs=4), 4, 1, np.random.default_rng(0))


# --- configuration ---------------------------------------------------------------------------------


def test_variant_names():
    assert variant_changes("baseline") == []
    assert variant_changes("rope+gqa+swa") == ["rope", "gqa", "swa"]
    cfg = load_config()
    assert variant_overrides("rope+gqa+swa", cfg.compare, 4, 4) == {
        "pos_emb": "rope",
        "n_kv_head": 2,
        "window": 8,
        "window_pattern": "L",
    }
    assert variant_overrides("mixed", cfg.compare, 4, 4)["window_pattern"] == "LLLG"
    with pytest.raises(ConfigError, match="did you mean 'rope'"):
        variant_changes("rop")
    with pytest.raises(ConfigError, match="contradicts"):
        variant_changes("gqa+mqa")
    with pytest.raises(ConfigError, match="only L"):
        variant_overrides("mixed", cfg.compare, 4, 2)  # LLLG over 2 layers has no global layer


def test_load_config_layers():
    cfg = load_config(
        None,
        ["--compare.window=16", "--compare.extrapolation=1,2", "--optim.lr=1e-3"],
        named={"compare.variants": "rope,swa", "compare.seeds": 3},
    )
    assert cfg.compare.window == 16 and cfg.compare.extrapolation == [1, 2] and cfg.train.optim.lr == 1e-3
    assert cfg.compare.variants == ["rope", "swa"] and cfg.compare.seeds == 3
    assert cfg.train.model.n_layer == 4  # the CPU default
    with pytest.raises(ConfigError, match="did you mean 'compare.window'"):
        load_config(None, ["--compare.windw=3"])
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config(None, named={"compare.variants": "baseline,flash"})


def test_config_file_with_a_preset_uses_the_preset_size(tmp_path):
    path = tmp_path / "gpu.toml"
    path.write_text('[model]\npreset = "gpt2"\nblock_size = 1024\n[data]\nblock_size = 1024\n[compare]\nvocab = 0\n')
    cfg = load_config(path)
    config = cfg.train.model.build()
    assert (config.n_layer, config.n_embd, config.block_size) == (12, 768, 1024)
    assert cfg.compare.vocab == 0


# --- measurements ----------------------------------------------------------------------------------


def test_compact_vocabulary_is_lossless(tmp_path):
    """The compacted copy keeps the most frequent tokens, spells the others as bytes, and decodes to
    exactly the original text, so its recorded bytes (and bits per byte) are unchanged."""
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200 + "a rare zebra appears once, 😀.\n")
    prepare(tmp_path / "src", Source([text]), val_fraction=0.1, workers=1, progress=False)
    coverage = compact_vocabulary(tmp_path / "src", tmp_path / "dst", 260, {"test": True})
    src, dst = TokenData(tmp_path / "src", "train"), TokenData(tmp_path / "dst", "train")
    original = src.read(0, len(src)).astype(int)
    counts = np.bincount(original, minlength=50257)
    counts[50256] = len(original)  # the separator always keeps its id
    top = np.argsort(-counts, kind="stable")[:4]
    meta = json.loads((tmp_path / "dst" / "meta.json").read_text())
    assert meta["vocabulary"]["kept_gpt2_ids"] == top.tolist() and meta["vocab_size"] == 260
    tokenizer = CompactTokenizer(meta["vocabulary"]["kept_gpt2_ids"])
    gpt2 = load_tokenizer()
    assert tokenizer.decode_bytes(dst.read(0, len(dst))) == gpt2.decode_bytes(original.tolist())
    assert (
        meta["splits"]["val"]["bytes"]
        == json.loads((tmp_path / "src" / "meta.json").read_text())["splits"]["val"]["bytes"]
    )
    assert coverage["train_spelled_fraction"] == pytest.approx(np.mean(~np.isin(original, top)))
    with pytest.raises(ConfigError, match="between 257"):
        compact_vocabulary(tmp_path / "src", tmp_path / "bad", 100)


def test_context_losses_score_the_same_tokens_and_refuse_learned_positions_past_their_table():
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 50, 2000)
    learned = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    out = context_losses(learned, tokens, 16, [1, 2, 4], 3, 64, torch.autocast("cpu", enabled=False))
    assert isinstance(out["1x"], float)
    assert out["2x"] == out["4x"] == "n/a: learned positions end at block_size (16)"
    rope = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, pos_emb="rope")).eval()
    out = context_losses(rope, tokens, 16, [1, 2, 4], 3, 64, torch.autocast("cpu", enabled=False))
    assert all(isinstance(v, float) for v in out.values())
    # 1x by hand: the three 64-token stretches cut into windows of 16
    starts = np.linspace(0, len(tokens) - 65, 3).round().astype(int)
    rows = torch.tensor(np.stack([tokens[s : s + 65] for s in starts]))
    _, loss = rope(rows[:, :-1].reshape(-1, 16), rows[:, 1:].reshape(-1, 16))
    assert out["1x"] == pytest.approx(loss.item(), rel=1e-5)


def test_peak_memory_sees_an_allocation():
    with PeakMemory(torch.device("cpu")) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del block
    if peak.bytes is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert peak.bytes >= 60 * 2**20


# --- the whole machinery, end to end ---------------------------------------------------------------

VARIANTS = "baseline,rope+gqa+swa,mixed"  # every code path: learned and rotary, GQA, window, local/global


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, one_thread) -> Path:
    out = tmp_path_factory.mktemp("compare") / "out"
    argv = ["compare", "--quick", "--variants", VARIANTS, "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return out


def test_compare_writes_every_artefact(quick_run):
    for name in (REPORT, RESULTS, *PLOTS):
        path = quick_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in PLOTS:
        assert (quick_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((quick_run / RESULTS).read_text())
    assert list(results["variants"]) == VARIANTS.split(",")
    assert results["command"].startswith("gpt2lab compare --variants")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _row(report: str, first_cell: str, table_header: str) -> list[str]:
    """The cells of the row starting with ``first_cell`` in the table under ``table_header``."""
    section = report[report.index(table_header) :]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} under {table_header!r}")


def test_report_numbers_come_from_the_runs(quick_run):
    results = json.loads((quick_run / RESULTS).read_text())
    report = (quick_run / REPORT).read_text()
    for name, v in results["variants"].items():
        final, speeds = [], []
        for run in v["runs"]:
            records = _metrics(Path(run["out_dir"]))
            vals = [r for r in records if "val_loss" in r]
            # results.json per run == metrics.jsonl
            assert run["final_val_loss"] == vals[-1]["val_loss"]
            assert run["val_curve"] == [[r["step"], r["val_loss"]] for r in vals]
            assert run["tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in records[1:])
            final.append(vals[-1]["val_loss"])
            speeds.append(run["tokens_per_s"])
        summary = v["summary"]
        # results.json summary == statistics of the runs
        assert summary["final_val_loss"]["mean"] == pytest.approx(statistics.fmean(final), abs=0, rel=1e-12)
        assert summary["final_val_loss"]["std"] == pytest.approx(statistics.stdev(final), rel=1e-12)
        # report.md == results.json
        row = _row(report, name, "## Quality and training cost")
        assert row[1] == f"{v['params']:,}"
        assert row[3] == fmt_stats(summary["final_val_loss"])
        assert row[3].startswith(f"{statistics.fmean(final):.4f} ± ")
        assert row[4] == fmt_stats(summary["tokens_per_s"], 0)
        row = _row(report, name, "## Inference memory and speed")
        assert row[1:] == [
            fmt_value(v["decode"]["kv_bytes_per_token"], 0),
            fmt_value(v["decode"]["cache_bytes"], 2, 2**20),
            fmt_value(v["decode"]["tokens_per_s"], 1),
        ]
        row = _row(report, name, "## Context extrapolation")
        assert row[1] == fmt_stats(summary["context_loss"]["1x"])
        row = _row(report, name, "## Long-range recall")
        per_bin = zip(*(r["recall"]["accuracy"] for r in v["runs"]), strict=True)
        means = [statistics.fmean(acc) if None not in acc else None for acc in per_bin]
        cells = [None if c == "n/a" else float(c.split()[0]) for c in row[1:]]
        assert cells == [None if m is None else round(m, 2) for m in means]
        for run in v["runs"]:
            row = _row(report, name, f"| {name} | {run['seed']} |")
            assert row[2] == fmt_value(run["final_val_loss"])


def test_report_marks_what_cannot_run(quick_run):
    results = json.loads((quick_run / RESULTS).read_text())
    v = results["variants"]
    assert v["baseline"]["summary"]["context_loss"]["4x"].startswith("n/a: learned positions end at block_size")
    assert isinstance(v["rope+gqa+swa"]["summary"]["context_loss"]["4x"], dict)  # rotary runs past it
    report = (quick_run / REPORT).read_text()
    assert re.search(r"\| baseline \| [\d.]+ ± [\d.]+ \| n/a: learned positions end at block_size \(32\)", report)
    # a window layer keeps window positions, a global layer all of them: the cache sizes show it
    kv = {name: v[name]["decode"]["kv_bytes_per_token"] for name in v}
    assert kv["mixed"] > kv["rope+gqa+swa"] and kv["baseline"] > kv["mixed"]
    reference = _row(report, "key ignored (reference)", "## Long-range recall")
    assert reference[1:] == [fmt_value(r, 2) for r in results["recall_reference"]]


def test_rerun_reuses_finished_runs(quick_run):
    results = json.loads((quick_run / RESULTS).read_text())
    stamps = {p: p.stat().st_mtime_ns for p in quick_run.glob("runs/*/*/*.json*")}
    cfg = load_config(None, quick=True, named={"compare.variants": VARIANTS})
    again = compare(cfg, quick_run, "again", progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing retrained
    for name, v in again["variants"].items():
        assert v["summary"]["final_val_loss"] == results["variants"][name]["summary"]["final_val_loss"]
        assert v["summary"]["recall_accuracy"] == results["variants"][name]["summary"]["recall_accuracy"]
