"""gpt2lab compare: the MQAR generator, statistics, paired initialisation, settings, the plan and its budget,
the GPU profile's dry run, and one --quick run of the whole machinery whose report numbers are traced back to
results.json and from there to the runs."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2lab.cli import main
from gpt2lab.compare import compare, stats
from gpt2lab.compare.analysis import SCHEMA
from gpt2lab.compare.mqar import IGNORE, MQARTask, distance_edges, mqar_batch, reach
from gpt2lab.compare.plan import build_plan, estimate, lm_config
from gpt2lab.compare.plots import PLOTS, write_plots
from gpt2lab.compare.pool import JOB_JSON, Job, makespan, run_jobs
from gpt2lab.compare.report import REPORT, RESULTS, ci, ratio
from gpt2lab.compare.settings import load_config, reference_of, variant_changes, variant_overrides
from gpt2lab.compare.training import paired_state_dict
from gpt2lab.config import GPTConfig
from gpt2lab.errors import ConfigError, GPT2LabError
from gpt2lab.eval import token_losses
from gpt2lab.model import GPT

# --- MQAR ----------------------------------------------------------------------------------------


def _pairs(task: MQARTask, row: np.ndarray) -> dict[int, tuple[int, int]]:
    """position -> (key, value) of every fused pair token of a sequence."""
    first = task.pair(0, 0)
    return {i: divmod(int(t) - first, task.n_values) for i, t in enumerate(row) if t >= first}


@pytest.mark.parametrize("distances", ["log-uniform", "uniform", [1, 4, 8, 10, 15, 17, 32, 63]])
def test_mqar_answers_lie_exactly_at_the_planted_distance(distances):
    task = MQARTask(seq_len=64, n_keys=8, n_values=8, groups=4)
    b = mqar_batch(task, 64, np.random.default_rng(0), distances)
    for row in range(64):
        pairs = _pairs(task, b.x[row])
        assert len(pairs) == 2 * task.groups and len({k for k, _ in pairs.values()}) == 2 * task.groups
        scored = np.flatnonzero(b.y[row] != IGNORE)
        assert b.controlled[row].sum() == 2 * task.groups and set(np.flatnonzero(b.controlled[row])) <= set(scored)
        for q in scored:
            key = int(b.x[row, q]) - task.key(0)
            d = int(b.distance[row, q])
            # the queried key was planted exactly d tokens back, holding the target value
            assert pairs[q - d] == (key, int(b.y[row, q]) - task.value(0))
            assert not any(k == key and p > q - d for p, (k, _) in pairs.items() if p < q)  # planted once
        assert (b.distance[row][b.y[row] == IGNORE] == -1).all()


def test_mqar_key_swap_moves_every_answer_to_the_twin():
    """The counterfactual copy exchanges the keys of each group's two pairs and nothing else: each query's
    answer becomes its twin's value, and the twins' values always differ."""
    task = MQARTask()
    b = mqar_batch(task, 32, np.random.default_rng(1))
    for row in range(32):
        pairs, swapped = _pairs(task, b.x[row]), _pairs(task, b.xs[row])
        assert set(pairs) == set(swapped)
        positions = sorted(pairs)
        groups = [(p, p + 1) for p in positions if p + 1 in pairs and (positions.index(p) % 2 == 0)]
        assert len(groups) == task.groups
        for a, c in groups:
            (ka, va), (kc, vc) = pairs[a], pairs[c]
            assert swapped[a] == (kc, va) and swapped[c] == (ka, vc) and va != vc
        others = [i for i in range(task.seq_len) if i not in pairs]
        assert (b.x[row, others] == b.xs[row, others]).all()
        for q in np.flatnonzero(b.y[row] != IGNORE):
            key = int(b.x[row, q]) - task.key(0)
            twin_value = next(v for p, (k, v) in swapped.items() if k == key)
            assert b.ys[row, q] == task.value(twin_value) != b.y[row, q]


def test_mqar_evaluation_distances_cover_every_bin_and_training_favours_short_ones():
    task = MQARTask()
    edges = distance_edges(8, [7, 14], 64)
    assert edges == [1, 4, 8, 10, 15, 17, 32, 63]
    b = mqar_batch(task, 512, np.random.default_rng(2), edges)
    counts = np.histogram(b.distance[b.controlled], bins=edges)[0]
    assert counts.min() > 400  # about an equal share per bin, whatever its width
    train = mqar_batch(task, 512, np.random.default_rng(3), "log-uniform").distance
    uniform = mqar_batch(task, 512, np.random.default_rng(3), "uniform").distance
    assert (train[train > 0] < 8).mean() > 1.5 * (uniform[uniform > 0] < 8).mean()


def test_reach_of_window_stacks():
    base = dict(vocab_size=81, block_size=64, n_head=4, n_embd=64)
    assert reach(GPTConfig(n_layer=1, window=8, **base), 64) == 7
    assert reach(GPTConfig(n_layer=2, window=8, **base), 64) == 14
    assert reach(GPTConfig(n_layer=2, window=8, window_pattern="LG", **base), 64) == 64
    assert reach(GPTConfig(n_layer=2, **base), 64) == 64


# --- statistics ----------------------------------------------------------------------------------


def test_t_quantiles_and_paired_interval():
    assert stats.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert stats.t_quantile(0.80, 4) == pytest.approx(0.9410, abs=1e-4)
    d = stats.paired([2.0, 2.1, 2.3, 2.0, 2.2], [2.1, 2.3, 2.4, 2.2, 2.3])  # differences -0.1 -0.2 -0.1 -0.2 -0.1
    sd = np.std([-0.1, -0.2, -0.1, -0.2, -0.1], ddof=1)
    assert d["mean"] == pytest.approx(-0.14) and d["sd"] == pytest.approx(sd)
    assert d["hi"] == pytest.approx(-0.14 + 2.7764451 * sd / math.sqrt(5))
    assert d["mdd80"] == pytest.approx((2.7764451 + 0.9409646) * sd / math.sqrt(5))
    assert d["verdict"] == "better" and d["p"] < 0.01


def test_a_fraction_interval_stays_within_0_and_1():
    """Three seeds' recall of 0.90, 1.00 and 1.00: the t-interval reaches past 1, which no recall can; cut
    to the fraction's range it ends at 1, the lower end unchanged."""
    free, cut = stats.interval([0.9, 1.0, 1.0]), stats.interval([0.9, 1.0, 1.0], bounds=(0.0, 1.0))
    assert free["hi"] > 1.0 and cut["hi"] == 1.0 and cut["lo"] == free["lo"] > 0.0
    assert stats.interval([0.0, 0.1, 0.0], bounds=(0.0, 1.0))["lo"] == 0.0


def test_a_difference_of_two_fractions_stays_within_minus_1_and_1():
    """Recall differences of 3 seeds that learned and 2 that stalled: the t-interval reaches past 1, which
    no difference of two fractions can; cut to (-1, 1) it ends at 1, its verdict unchanged."""
    variant, reference = [0.905, 0.849, 0.866, 0.135, 0.232], [0.1, 0.0, 0.05, 0.1, 0.0]
    free = stats.paired(variant, reference, below="worse", above="better")
    cut = stats.paired(variant, reference, below="worse", above="better", bounds=(-1.0, 1.0))
    assert free["hi"] > 1.0 and cut["hi"] == 1.0 and cut["lo"] == free["lo"]
    assert cut["verdict"] == free["verdict"] == "better" and cut["p"] == free["p"]


def test_loss_differences_of_round_off_alone_are_not_tested():
    """Position bins a longer context cannot change differ by float32 round-off only: rounded to
    LOSS_DECIMALS they are the same in every seed, untested, where the raw values would be a verdict."""
    from gpt2lab.compare.analysis import _resolved

    noise = [3.1e-8, 1.2e-8, 5.0e-8, 2.2e-8, 4.4e-8]
    assert stats.differences(noise, below="helps", above="hurts")["verdict"] == "hurts"
    resolved = stats.differences(_resolved(noise), below="helps", above="hurts")
    assert resolved["p"] is None and resolved["verdict"].startswith("the same in every seed")
    assert _resolved([-1e-9, 0.0123456789]) == [0.0, 0.012346] and math.copysign(1, _resolved([-1e-9])[0]) == 1


def test_a_difference_is_settled_by_its_own_seed_at_more_steps():
    """The calibration run (first seed, more steps) is held against that seed's own difference, within the
    scatter of one seed's difference (t x sd of the seeds'): the same difference is settled, whatever the
    seeds' mean; a change past the scatter is transient; no spread between seeds decides nothing."""
    from gpt2lab.compare.analysis import _settled

    def run(loss):
        return {"final_loss": loss, "val_curve": [[10, loss]]}

    comparison = {"final": stats.differences([-0.10, -0.05, -0.02, -0.08, -0.06])}
    reach = stats.t_quantile(0.975, 4) * comparison["final"]["sd"]
    same = _settled(comparison, run(2.0 - 0.10), run(2.0), run(3.0 - 0.10), run(3.0), 3)
    assert same["settled"] is True and same["tolerance"] == pytest.approx(reach)
    moved = _settled(comparison, run(2.0 - 0.10 + 1.01 * reach), run(2.0), run(3.0 - 0.10), run(3.0), 3)
    assert moved["settled"] is False
    for flat in ([-0.1], [-0.1, -0.1, -0.1]):
        undecided = _settled({"final": stats.differences(flat)}, run(1.9), run(2.0), run(2.9), run(3.0), 3)
        assert undecided["settled"] is None and undecided["tolerance"] is None


def test_verdicts_never_say_same():
    assert stats.paired([1.0, 1.2, 1.1], [1.1, 1.1, 1.1])["verdict"] == "no difference detected"
    assert stats.paired([2.0, 2.1, 2.2], [1.0, 1.0, 1.1])["verdict"] == "worse"
    higher = stats.paired([0.9, 0.95, 0.92], [0.5, 0.55, 0.5], below="worse", above="better")
    assert higher["verdict"] == "better"
    assert stats.paired([1.0], [0.5])["verdict"].startswith("n/a")
    # every seed the same difference (accuracies at their ceiling, or one query apart in every seed): no
    # spread, so no t-test: no p-value to enter Holm's family, no MDD80 that would claim any effect is seen
    same = stats.paired([0.999, 0.999, 0.999], [1.0, 1.0, 1.0])
    assert same["verdict"] == "better by the same amount in every seed (no spread: untested)"
    assert same["p"] is None and same["mdd80"] is None
    ceiling = stats.paired([1.0] * 5, [1.0] * 5, below="worse", above="better")
    assert ceiling["verdict"] == "the same in every seed (no spread: untested)" and ceiling["mdd80"] is None
    assert stats.holm([ceiling["p"], same["p"], 0.01]) == [False, False, True]


def test_values_that_are_not_finite_are_refused_and_a_nan_p_is_never_rejected():
    with pytest.raises(ValueError, match="not all finite"):
        stats.paired([1.0, float("nan"), 1.2], [1.0, 1.1, 1.2])
    with pytest.raises(ValueError, match="not all finite"):
        stats.interval([1.0, float("inf")])
    assert stats.holm([float("nan"), 0.5, 0.001]) == [False, False, True]


def test_recall_verdicts_separate_lookup_guessing_chance_and_undecided():
    """Lookup needs the key-swap ("both") interval above 0.25; guessing needs it at or below 0.25 with the
    original above chance; an interval that spans 0.25 (seeds split between lookup and guessing) decides
    nothing."""
    from gpt2lab.compare.analysis import _recall_verdict

    def row(orig, both):
        return {
            "queries": 500,
            "orig": dict(zip(("mean", "lo", "hi"), orig, strict=True)),
            "both": dict(zip(("mean", "lo", "hi"), both, strict=True)),
        }

    assert _recall_verdict(row((1.0, 0.99, 1.0), (0.98, 0.9, 1.0)), 0.125) == "lookup"
    assert _recall_verdict(row((0.5, 0.4, 0.6), (0.1, 0.05, 0.15)), 0.125) == "positional guessing"
    assert _recall_verdict(row((0.13, 0.12, 0.13), (0.03, 0.02, 0.04)), 0.125) == "not above chance"
    assert _recall_verdict(row((0.74, 0.31, 1.0), (0.62, -0.03, 1.0)), 0.125) == "undecided"
    assert _recall_verdict({"queries": 50, "orig": {}, "both": {}}, 0.125).startswith("n/a")


def test_uptraining_shares_only_where_there_is_a_gap_to_close():
    """A share of the (scratch - MHA) gap is computed only where the scratch model is detected worse."""
    from gpt2lab.compare.analysis import _arm

    mha = [2.0, 2.1, 2.2, 2.3, 2.4]
    worse = [m + 0.1 + 0.001 * i for i, m in enumerate(mha)]
    better = [m - 0.1 + 0.001 * i for i, m in enumerate(mha)]
    up = [m + 0.05 + 0.002 * (i % 2) for i, m in enumerate(mha)]
    arm = _arm("mean", 0.1, up, mha, {"scratch_worse": worse, "scratch_better": better})
    closed = arm["closes_scratch_worse_gap"]
    assert closed["mean"] == pytest.approx((0.102 - 0.0508) / 0.102)
    assert closed["lo"] < closed["mean"] < closed["hi"]
    assert arm["closes_scratch_better_gap"] is None


def test_a_shares_interval_is_the_set_of_ratios_a_paired_t_test_keeps():
    """Fieller's interval for mean(a) / mean(b), checked against its definition by brute force: on a fine grid
    of R, a two-sided paired t-test of a - R b keeps exactly the R between lo and hi."""
    a = [0.11, 0.14, 0.10, 0.13, 0.085]
    b = [0.22, 0.27, 0.24, 0.24, 0.22]
    share = stats.ratio_of_means(a, b)
    assert share["mean"] == pytest.approx(np.mean(a) / np.mean(b))
    grid = np.linspace(0.2, 0.8, 60001)
    kept = [
        r
        for r in grid
        if stats.differences([x - r * y for x, y in zip(a, b, strict=True)])["lo"]
        <= 0
        <= stats.differences([x - r * y for x, y in zip(a, b, strict=True)])["hi"]
    ]
    assert kept[0] == pytest.approx(share["lo"], abs=2e-5) and kept[-1] == pytest.approx(share["hi"], abs=2e-5)
    assert share["lo"] > grid[0] and share["hi"] < grid[-1]
    # a denominator whose interval holds 0 bounds no interval; one seed gives none
    assert stats.ratio_of_means(a, [0.05, -0.04, 0.03, -0.02, 0.01])["lo"] is None
    assert stats.ratio_of_means(a[:1], b[:1]) == {"n": 1, "mean": a[0] / b[0], "lo": None, "hi": None}


def test_decode_rounds_time_warm_models(monkeypatch):
    """A model's first decode steps in a setting also plan (and may calibrate) its kernels, several times slower
    than the next: they run untimed, so no alternated round carries them."""
    from gpt2lab.compare import efficiency

    calls: list[int] = []

    def rate(model, token, start, n, device):
        calls.append(id(model))
        return 1.0 if calls.count(id(model)) == 1 else 2.0  # a model's first call: the slow one

    monkeypatch.setattr(efficiency, "_rate", rate)
    config = GPTConfig.from_name("debug", vocab_size=256, n_layer=1, block_size=64)
    models = {name: GPT(config).eval() for name in ("ref", "a", "b")}
    params = {"reference": "ref", "variants": ["a", "b"], "new_tokens": 4, "rounds": 3}
    setting = efficiency._decode_setting(models, params, 1, 32, torch.device("cpu"))
    assert setting["rates"] == {"a": [[2.0, 2.0]] * 3, "b": [[2.0, 2.0]] * 3}


def test_holm_steps_down():
    assert stats.holm([0.01, 0.04, 0.03, None]) == [True, False, False, False]  # 0.01 < 0.05/3; 0.03 > 0.05/2
    assert stats.holm([0.001, 0.01, 0.02]) == [True, True, True]


# --- paired initialisation -----------------------------------------------------------------------


def test_every_variant_of_a_seed_starts_from_the_baselines_weights():
    base = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=32)
    ref = paired_state_dict(base, seed=7)
    variant = GPTConfig(**{**base.to_dict(), "pos_emb": "rope", "n_kv_head": 2, "window": 8, "window_pattern": "LG"})
    sd = paired_state_dict(variant, seed=7)
    assert "wpe.weight" in ref and "wpe.weight" not in sd
    for key, tensor in sd.items():
        if "c_attn" in key:
            q, k, v = ref[key].split((32, 32, 32))
            assert torch.equal(tensor, torch.cat((q, k[:16], v[:16])))  # the first 2 of 4 key/value heads
        else:
            assert torch.equal(tensor, ref[key]), key
    assert not torch.equal(paired_state_dict(base, seed=8)["wte.weight"], ref["wte.weight"])
    GPT.from_state_dict(variant, sd)  # a complete, loadable state dict


def test_token_losses_are_per_token_cross_entropy_within_windows():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16, pos_emb="rope")).eval()
    rows = torch.randint(0, 50, (3, 33))
    losses = token_losses(model, rows, 16)
    assert losses.shape == (3, 32)
    second = model(rows[1:2, 16:32])[0][0]  # the second window of row 1 starts with no context
    expected = torch.nn.functional.cross_entropy(second, rows[1, 17:33], reduction="none")
    np.testing.assert_allclose(losses[1, 16:], expected.detach().numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="cannot be cut"):
        token_losses(model, rows, 10)


# --- settings ------------------------------------------------------------------------------------


def test_variant_names_and_references():
    assert variant_changes("rope+gqa+swa") == ["rope", "gqa", "swa"]
    assert [reference_of(v) for v in ("baseline", "rope", "rope+swa", "swa")] == [None, "baseline", "rope", "baseline"]
    assert variant_overrides("rope+gqa+swa", 4, 4, 8, "LLLG") == {
        "pos_emb": "rope", "n_kv_head": 2, "window": 8, "window_pattern": "L",
    }  # fmt: skip
    with pytest.raises(ConfigError, match="did you mean 'rope'"):
        variant_changes("rop")
    with pytest.raises(ConfigError, match="contradicts"):
        variant_changes("gqa+mqa")
    with pytest.raises(ConfigError, match="only L"):
        variant_overrides("mixed", 4, 2, 8, "LLLG")  # no global layer among 2


def test_load_config_layers_and_errors():
    cfg = load_config(None, ["--mqar.window=4", "--extrapolation.pi_factors=2"], named={"compare.seeds": 3})
    assert cfg.mqar.window == 4 and cfg.extrapolation.pi_factors == [2] and cfg.compare.seeds == 3
    assert cfg.train.model.n_embd == 64 and cfg.train.run.steps == 300  # the default profile
    assert load_config(profile="quick").compare.seeds == 2
    with pytest.raises(ConfigError, match="did you mean 'mqar.window'"):
        load_config(None, ["--mqar.windw=3"])
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config(None, named={"compare.variants": "baseline,flash"})
    with pytest.raises(ConfigError, match="does not train"):
        load_config(None, ["--compare.variants=baseline,rope", "--extrapolation.variants=rope+swa"])
    with pytest.raises(ConfigError, match="unknown profile"):
        load_config(profile="huge")
    with pytest.raises(ConfigError, match=r"compare.workers must be >= 0, got -1"):
        load_config(None, ["--compare.workers=-1"])


@pytest.mark.parametrize(
    "settings, phrase",
    [
        (["--efficiency.kernel_ratios=0"], "every efficiency.kernel_ratios value between 1 and"),
        (["--efficiency.kernel_ratios=8,2048"], r"got contexts \[1024, 4096\], ratios \[8, 2048\]"),
        (["--efficiency.kernel_contexts=0"], "efficiency.kernel_contexts must be >= 1"),
        (["--efficiency.reference=baseline", "--efficiency.variants=rope"], "'baseline' has learned positions"),
    ],
)
def test_efficiency_settings_that_cannot_be_timed_are_refused_before_any_training(settings, phrase):
    """A window of no position, a kernel context of none, or a reference whose learned positions end
    before the contexts it is timed at would fail only in the efficiency job, after every training job."""
    with pytest.raises(ConfigError, match=phrase):
        load_config(None, settings)


# --- plan and budget -----------------------------------------------------------------------------


def test_the_timing_job_is_timed_again_on_another_machine(monkeypatch):
    """Training results carry over between machines; timings do not: the efficiency job's key holds the
    machine, the training jobs' keys do not."""
    from gpt2lab.compare import plan as plan_module
    from gpt2lab.compare.pool import job_keys

    data = {"dir": "d", "overfit_dir": "o", "id": "x"}
    keys = []
    for name in ("CPU: one", "CPU: another"):
        monkeypatch.setattr(plan_module, "machine", lambda name=name: name)
        keys.append(job_keys(build_plan(load_config(), data, 1024).jobs))
    assert keys[0]["efficiency"] != keys[1]["efficiency"]
    assert keys[0]["lm/rope/seed1337"] == keys[1]["lm/rope/seed1337"]


def test_plan_has_every_job_with_its_dependencies():
    cfg = load_config()
    plan = build_plan(cfg, {"dir": "d", "overfit_dir": "o", "id": "x"}, 1024)
    names = {j.name for j in plan.jobs}
    seeds = range(1337, 1342)
    assert {f"lm/{v}/seed{s}" for v in cfg.compare.variants for s in seeds} <= names
    assert {"calibration/rope/seed1337", "calibration/rope+swa/seed1337", "efficiency"} <= names
    assert len([n for n in names if n.startswith("mqar/")]) == 5 * 6
    for job in plan.jobs:
        assert set(job.deps) <= names, job.name
    extrap = next(j for j in plan.jobs if j.name == "extrapolation/rope/seed1338")
    assert set(extrap.deps) == {"lm/rope/seed1338", "pi-finetune/rope/seed1338"}
    efficiency = next(j for j in plan.jobs if j.name == "efficiency")
    assert "lm/rope/seed1337" in efficiency.after and "extrapolation/rope/seed1337" not in efficiency.after
    assert efficiency.deps == ()  # it times models of its own: the training jobs only go first
    assert lm_config(cfg, "rope+mixed", 1024).window_pattern == "LLLG"
    B, T = cfg.train.data.batch_size, cfg.train.data.block_size
    for job in plan.jobs:  # every job that trains counts what it trains on, fine-tuning and uptraining included
        assert (job.tokens > 0) == (job.steps > 0), job.name
    uptrain = next(j for j in plan.jobs if j.kind == "uptrain")
    assert uptrain.tokens == uptrain.steps * B * T
    f = cfg.extrapolation.pi_finetune_factor
    pi = next(j for j in plan.jobs if j.kind == "pi_finetune")
    assert pi.tokens == pi.steps * (B // f) * f * T


def test_compare_refuses_model_init_whatever_the_profile_sets():
    """compare trains from paired initial weights: model.init is refused as such, not as a clash with the
    profile's model keys."""
    for profile in ("default", "quick"):
        with pytest.raises(ConfigError, match="remove model.init"):
            load_config(overrides=["--model.init=gpt2"], profile=profile)


def test_estimate_uses_the_calibration_and_the_schedule():
    cfg = load_config()
    plan = build_plan(cfg, {"dir": "d", "overfit_dir": "o", "id": "x"}, 1024)
    c = {"step_s": 0.25, "forward_s_per_token": 1e-5, "decode_step_s": 5e-3, "bytes_per_s": 5e9, "flops_per_s": 1e10}
    costs = {j.shape: c for j in plan.jobs}
    estimate(cfg, plan, costs)
    lm = next(j for j in plan.jobs if j.name == "lm/rope/seed1337")
    scored = 102400 + 6 * 4 * 12 * 256  # the final val tokens and 6 curve evaluations
    assert lm.cost == pytest.approx(300 * 0.25 + scored * 1e-5)
    jobs = [Job("a", "x", {}, "p", cost=4), Job("b", "x", {}, "p", cost=3), Job("c", "x", {}, "p", cost=3, deps=("a",))]
    assert makespan(jobs, 2) == 7  # a and b start; c waits for a
    assert makespan(jobs, 1) == 10


def _fake(kind: str, params: dict, run_dir: Path, root: Path) -> dict:
    (run_dir / "touched").write_text(str(params["x"]))
    return {"x2": 2 * params["x"]}


def test_jobs_are_cached_by_their_key(tmp_path):
    jobs = [Job("one", "fake", {"x": 1}, "p"), Job("two", "fake", {"x": 2}, "p", deps=("one",))]
    assert run_jobs(jobs, tmp_path, _fake, 1, None, False)["two"]["x2"] == 4
    stamp = (tmp_path / "runs/two" / JOB_JSON).stat().st_mtime_ns
    assert run_jobs(jobs, tmp_path, _fake, 1, None, False)["one"]["x2"] == 2
    assert (tmp_path / "runs/two" / JOB_JSON).stat().st_mtime_ns == stamp  # reused
    assert sorted(p.name for p in (tmp_path / "runs/two").iterdir()) == [JOB_JSON, "log.txt", "touched"]
    jobs[0].params = {"x": 5}  # a changed job is redone, and so is every job that reads it
    results = run_jobs(jobs, tmp_path, _fake, 1, None, False)
    assert results["one"]["x2"] == 10 and (tmp_path / "runs/two" / JOB_JSON).stat().st_mtime_ns != stamp


def test_a_job_that_only_waits_for_others_keeps_its_result_when_they_change(tmp_path):
    """``after`` orders, ``deps`` feed: a job run after another is not redone when that one changes."""
    jobs = [Job("one", "fake", {"x": 1}, "p"), Job("two", "fake", {"x": 2}, "p", after=("one",))]
    run_jobs(jobs, tmp_path, _fake, 1, None, False)
    stamp = (tmp_path / "runs/two" / JOB_JSON).stat().st_mtime_ns
    jobs[0].params = {"x": 5}
    assert run_jobs(jobs, tmp_path, _fake, 1, None, False)["one"]["x2"] == 10
    assert (tmp_path / "runs/two" / JOB_JSON).stat().st_mtime_ns == stamp


def _failing(kind: str, params: dict, run_dir: Path, root: Path) -> dict:
    if params["x"] == 2:
        raise ConfigError("this job's settings cannot work")
    return {"x2": 2 * params["x"]}


def _dying(kind: str, params: dict, run_dir: Path, root: Path) -> dict:
    if params["x"] == 2:
        os._exit(9)  # as a worker killed, or ended by the kernel for memory
    time.sleep(0.5)
    return {"x2": 2 * params["x"]}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failing_job_is_named_and_finished_ones_stay(workers, tmp_path, capsys):
    jobs = [Job("one", "fake", {"x": 1}, "p", cost=2), Job("two", "fake", {"x": 2}, "p", cost=1)]
    with pytest.raises(ConfigError, match="cannot work"):
        run_jobs(jobs, tmp_path, _failing, workers, 1, False)
    assert "compare job two failed" in capsys.readouterr().err
    assert (tmp_path / "runs/one" / JOB_JSON).is_file() and not (tmp_path / "runs/two" / JOB_JSON).exists()


def test_a_worker_that_dies_is_a_clear_error_naming_the_jobs_that_ran(tmp_path, capsys):
    """A worker killed mid-job breaks the pool, and every running job's future says so: the error names
    the jobs that were running instead of blaming one of them."""
    jobs = [Job("one", "fake", {"x": 1}, "p", cost=2), Job("two", "fake", {"x": 2}, "p", cost=1)]
    with pytest.raises(GPT2LabError, match=r"a compare worker process died .* these jobs ran: .*two; .* run the same"):
        run_jobs(jobs, tmp_path, _dying, 2, 1, False)
    assert "failed" not in capsys.readouterr().err


ORPHAN = """
import concurrent.futures, multiprocessing, os
from gpt2lab.compare import pool
if __name__ == "__main__":
    workers = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=multiprocessing.get_context("spawn"), initializer=pool._init_worker, initargs=(None,)
    )
    print(workers.submit(os.getpid).result(), flush=True)
    os.kill(os.getpid(), 9)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the kernel's parent-death signal is Linux's")
def test_workers_die_with_the_process_that_started_them(tmp_path):
    """A pool's idle worker waits on its queue forever once the parent is gone (killed, or a timeout's
    SIGTERM): the kernel kills it with its parent instead."""
    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    worker = int(proc.stdout.split()[0])

    def alive() -> bool:
        try:
            return Path(f"/proc/{worker}/stat").read_text().split(") ")[1][0] not in "ZX"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive()


def test_a_finished_run_without_its_checkpoints_says_how_to_train_it_again(tmp_path):
    """A committed output keeps job.json but not the checkpoints: a job that reads such a run's model
    says which file to delete, where the plain error would repeat on every rerun."""
    from gpt2lab.compare.training import load_trained
    from gpt2lab.errors import CheckpointError

    run = tmp_path / "runs" / "lm" / "rope" / "seed1337"
    run.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="has no complete checkpoint yet"):
        load_trained(run)
    (run / JOB_JSON).write_text('{"key": {}, "value": {}}')
    with pytest.raises(CheckpointError, match=rf"checkpoints are gone .* delete {re.escape(str(run / JOB_JSON))}"):
        load_trained(run)


def test_gpu_profile_dry_run_on_the_cpu(capsys):
    """The GPU profile's plan builds every model and trains one step of each shape here, and its FLOP-based
    estimate fits the 5 minutes it is sized for."""
    assert main(["compare", "--profile", "gpu", "--dry-run", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "dry run: every model" in captured.out
    assert "GPU seconds from FLOPs" in captured.err and "language models" in captured.err
    minutes = float(captured.err.split("estimated time: ")[1].split(" min")[0])
    assert 2 < minutes < 6


# --- the whole machinery, end to end -------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "out"
    assert main(["compare", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_compare_writes_every_artefact(quick_run):
    for name in (REPORT, RESULTS, *PLOTS):
        path = quick_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    for name in PLOTS:
        assert (quick_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((quick_run / RESULTS).read_text())
    assert results["schema"] == SCHEMA and results["profile"] == "quick"
    assert {"lm", "mqar", "extrapolation", "uptraining", "overfitting", "efficiency"} <= set(results)


def test_a_plot_that_fails_part_way_leaves_the_previous_one_whole(quick_run, tmp_path, monkeypatch):
    """Figures are replaced whole or not at all: a write that dies part-way (a full disk, a kill) keeps
    the previous figure under its name and leaves no temporary file."""
    from matplotlib.figure import Figure

    out = tmp_path / "report"
    out.mkdir()
    for name in PLOTS:
        (out / name).write_bytes((quick_run / name).read_bytes())
    before = {name: (out / name).read_bytes() for name in PLOTS}

    def dying(self, target, **kwargs):
        half = b"\x89PNG half a figure"
        Path(target).write_bytes(half) if isinstance(target, (str, Path)) else target.write(half)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", dying)
    results = json.loads((quick_run / RESULTS).read_text())
    with pytest.raises(GPT2LabError, match=r"no space left .*/lm\.png; free some space"):
        write_plots(results, out)
    assert {name: (out / name).read_bytes() for name in PLOTS} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(PLOTS)


def _job(out: Path, name: str) -> dict:
    return json.loads((out / "runs" / name / JOB_JSON).read_text())["value"]


def _row(report: str, first_cell: str, table_header: str) -> list[str]:
    """The cells of the row starting with ``first_cell`` in the first table after ``table_header``."""
    section = report[report.index(table_header) :]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} under {table_header!r}")


def test_language_model_numbers_come_from_the_runs(quick_run):
    results = json.loads((quick_run / RESULTS).read_text())
    report = (quick_run / REPORT).read_text()
    seeds = results["seeds"]
    for v, entry in results["lm"]["variants"].items():
        finals = []
        for s in seeds:
            job = _job(quick_run, f"lm/{v}/seed{s}")
            records = [
                json.loads(line) for line in (quick_run / f"runs/lm/{v}/seed{s}/metrics.jsonl").read_text().splitlines()
            ]
            assert job["val_curve"] == [[r["step"], r["val_loss"]] for r in records if "val_loss" in r]
            assert job["final_loss"] == pytest.approx(float(np.mean(job["per_sequence"])), rel=1e-6)
            finals.append(job["final_loss"])
        assert entry["per_seed"] == finals
        assert entry["final_loss"]["mean"] == pytest.approx(np.mean(finals), rel=1e-12)
        assert _row(report, v, "## Language models")[1] == ci(entry["final_loss"])
    for c in results["lm"]["comparisons"]:
        v, ref = c["variant"], c["reference"]
        diffs = [
            a - b
            for a, b in zip(
                results["lm"]["variants"][v]["per_seed"], results["lm"]["variants"][ref]["per_seed"], strict=True
            )
        ]
        assert c["final"]["values"] == pytest.approx(diffs)
        assert _row(report, f"{v} - {ref}", "Paired differences")[1] == ci(c["final"], 4, True)


def test_mqar_and_efficiency_numbers_come_from_the_runs(quick_run):
    results = json.loads((quick_run / RESULTS).read_text())
    report = (quick_run / REPORT).read_text()
    m = results["mqar"]
    for name, model in m["models"].items():
        per_seed = []
        for s in results["seeds"]:
            ev = _job(quick_run, f"mqar/{name}/seed{s}")["eval"]
            lo, hi = m["edges"][0], m["edges"][1]
            per_seed.append(sum(ev["both"][lo:hi]) / sum(ev["n"][lo:hi]))
        assert model["bins"][0]["both"]["mean"] == pytest.approx(np.mean(per_seed))
        assert f"**{name}**" in report
    rows = results["efficiency"]["decode"]
    job = _job(quick_run, "efficiency")
    first = rows[0]
    pairs = next(d for d in job["decode"] if (d["batch"], d["context"]) == (first["batch"], first["context"]))["rates"][
        first["variant"]
    ]
    assert first["ratio"]["mean"] == pytest.approx(math.exp(np.mean([math.log(v / r) for r, v in pairs])))
    assert _row(report, str(first["batch"]), "## Efficiency")[5] == ratio(first["ratio"])


def test_extrapolation_spans_keep_their_positions_beside_their_intervals(quick_run):
    """Past the training context, "near" and "far" are a span of positions and the interval of the mean
    loss difference over it: neither overwrites the other."""
    results = json.loads((quick_run / RESULTS).read_text())
    context, spans = results["extrapolation"]["context"], []
    for runs in results["extrapolation"]["variants"].values():
        for run in (r for r in runs.values() if isinstance(r, dict) and "length" in r):
            spans += [(run["length"], name, run[name]) for name in ("near", "far") if name in run]
    assert spans
    for length, name, span in spans:
        start, end = span["positions"]
        assert (start, end) == ((context, min(length, context * 3 // 2)) if name == "near" else (2 * context, length))
        assert span["lo"] <= span["mean"] <= span["hi"] and len(span["values"]) == span["n"]


def test_the_recall_plot_says_how_many_seeds_each_models_bins_come_from(quick_run):
    """Recall bins come from the seeds whose runs plateaued (``verdict_seeds``), which may be fewer than
    the run's seeds: each model's legend entry gives its own n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gpt2lab.compare import plots

    results = json.loads((quick_run / RESULTS).read_text())
    fig = plots._mqar(plt, results)
    want = {f"{name} (n = {model['verdict_seeds']})" for name, model in results["mqar"]["models"].items()}
    got = {t.get_text() for ax in fig.axes for legend in [ax.get_legend()] if legend for t in legend.get_texts()}
    plt.close(fig)
    assert want <= got


def test_learned_positions_report_their_error_and_windows_keep_their_cache(quick_run):
    results = json.loads((quick_run / RESULTS).read_text())
    assert results["extrapolation"]["variants"]["baseline"]["full"].startswith("error: sequence of 256 tokens exceeds")
    assert "error: sequence of 256 tokens exceeds block_size 64" in (quick_run / REPORT).read_text()
    kv = results["efficiency"]["kv_cache"]["bytes"]
    assert kv["rope+swa"][-1] == kv["rope+swa"][0] and kv["rope"][-1] > kv["rope+mixed"][-1] > kv["rope+swa"][-1]
    assert kv["baseline"][-1] is None  # no cache past the learned position table


def test_rerun_reuses_finished_runs(quick_run):
    stamps = {p: p.stat().st_mtime_ns for p in quick_run.glob("runs/**/job.json")}
    results = json.loads((quick_run / RESULTS).read_text())
    again = compare(load_config(profile="quick"), quick_run, "again", progress=False)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing ran again
    assert again["lm"]["variants"] == results["lm"]["variants"]


def test_a_dry_run_counts_the_jobs_its_directory_already_holds(quick_run, capsys):
    """The plan a dry run prints for a finished directory has every job done and nothing left to run; the
    directory is left as it was."""
    listing = {p: p.stat().st_mtime_ns for p in quick_run.rglob("*")}
    assert main(["compare", "--quick", "--dry-run", "--out", str(quick_run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    jobs = len(list(quick_run.glob("runs/**/job.json")))
    assert f"plan: {jobs} jobs ({jobs} already done)" in err and "estimated time: 0.0 min" in err, err
    assert {p: p.stat().st_mtime_ns for p in quick_run.rglob("*")} == listing


def test_uptraining_sentences_read_whether_or_not_a_gap_was_detected(quick_run):
    results = json.loads((quick_run / RESULTS).read_text())
    report = (quick_run / REPORT).read_text()
    for target in results["uptraining"]["targets"]:
        for c in target["conversion_gap_closed"]:
            share = c["share"]
            phrase = (
                "no conversion gap detected to close"
                if share is None
                else f"closes {100 * share['mean']:.0f}% [{100 * share['lo']:.0f}%, {100 * share['hi']:.0f}%] of the"
            )
            assert f"- {c['method']}, {100 * c['fraction']:g}% uptraining: {phrase}" in report


def test_overfitting_of_one_variant_has_no_empty_comparison_table():
    from gpt2lab.compare.report import _overfitting

    interval = {"n": 2, "mean": 1.0, "sd": 0.1, "lo": 0.9, "hi": 1.1}
    entry = {"n_kv_head": 4, "train_loss": interval, "val_loss": interval, "gap": interval}
    config = {"overfitting": {"tokens": 1000, "steps": 10}, "data": {"batch_size": 2, "block_size": 50}}
    lines = _overfitting({"overfitting": {"variants": {"rope": entry}, "comparisons": []}, "config": config})
    assert not any("gap difference" in line for line in lines)
    assert any(line.startswith("| rope") for line in lines)


def test_speed_intervals_never_go_below_zero(quick_run):
    """Two or three noisy speeds give a wide t-interval; a speed's is cut at 0, which it cannot go below."""
    results = json.loads((quick_run / RESULTS).read_text())
    speeds = [v["tokens_per_s"] for v in results["lm"]["variants"].values()]
    speeds += [row[k] for row in results["efficiency"]["decode"] for k in ("tokens_per_s", "reference_tokens_per_s")]
    assert speeds and all(s["lo"] is None or s["lo"] >= 0 for s in speeds)


def test_a_converted_model_better_than_mha_has_no_gap_to_close():
    """Converted (not trained) below MHA's loss: no conversion gap, so no share of one, even where
    uptraining then moves the loss; converted above it: the share of that gap the uptraining closed."""
    from gpt2lab.compare.analysis import conversion_gap_closed

    def target(start: float) -> dict:
        mha = [2.0, 2.1, 2.2, 2.3, 2.4]
        converted = [m + start + 0.001 * i for i, m in enumerate(mha)]
        uptrained = [m + start / 2 + 0.001 * (i % 2) for i, m in enumerate(mha)]
        arms = [(0.0, converted), (0.1, uptrained)]
        return {
            "arms": [
                {"method": "mean", "fraction": f, "loss": stats.interval(v), "vs_mha": stats.paired(v, mha)}
                for f, v in arms
            ]
        }

    assert conversion_gap_closed(target(-0.05))[0]["share"] is None
    share = conversion_gap_closed(target(+0.05))[0]["share"]
    assert share["mean"] == pytest.approx(0.5, abs=0.02) and share["lo"] < share["mean"] < share["hi"]


def test_each_window_kernels_ratio_sits_under_its_own_column():
    """The kernel columns are sorted by name; each row's ratios must follow that order, not the order the
    timings came in (FlexAttention, on CUDA, after SDPA + mask)."""
    from gpt2lab.compare.analysis import efficiency_section
    from gpt2lab.compare.report import _efficiency

    seconds = {
        "full causal (SDPA)": [1.0, 1.01, 0.99, 1.0],
        "window: SDPA + mask": [2.0, 2.03, 1.98, 2.01],
        "window: FlexAttention": [0.5, 0.51, 0.49, 0.5],
    }
    result = {
        "device": "cuda",
        "dtype": "bfloat16",
        "decode": [],
        "kernels": [{"context": 4096, "window": 512, "ratio": 8, "seconds": seconds}],
    }
    lines = _efficiency({"efficiency": efficiency_section(result, {}, "rope", [])})
    header = next(line for line in lines if line.startswith("| T "))
    row = lines[lines.index(header) + 2]
    columns = dict(zip(header.strip("|").split("|"), row.strip("|").split("|"), strict=True))
    assert columns[" window: FlexAttention / full "].strip().startswith("0.50x") and "faster" in row
    assert columns[" window: SDPA + mask / full "].strip().startswith("2.0")


def test_extrapolation_bins_of_other_widths_get_their_own_headers():
    from gpt2lab.compare.report import _extrapolation_bins

    def mode(edges: list[int]) -> dict:
        bins = [stats.differences([0.01 * i, 0.02 * i, 0.015 * i]) for i in range(1, len(edges))]
        return {"length": edges[-1], "edges": edges, "bins": bins}

    lines = _extrapolation_bins("rope", {"zero-shot": mode([0, 1024, 1536, 2048]), "pi x5": mode([0, 1024, 1280])})
    headers = [line for line in lines if line.startswith("| rope: minus 1x")]
    assert headers == [
        "| rope: minus 1x | 0-1023 | 1024-1535 | 1536-2047 |",
        "| rope: minus 1x | 0-1023 | 1024-1279 |",
    ]


def test_holm_covers_the_efficiency_verdicts():
    from gpt2lab.compare.analysis import _ratio, mark_holm

    decided = _ratio([0.30, 0.31, 0.29, 0.30, 0.32], below="slower", above="faster")
    assert decided["verdict"] == "faster" and decided["p"] < 1e-4
    results = {"efficiency": {"decode": [{"ratio": decided}], "kernels": [{"vs_full": {"w": dict(decided)}}]}}
    assert mark_holm(results) == 2 and decided["holm"] is True


def test_each_job_records_the_machine_it_ran_on(quick_run):
    """A report made where its jobs ran says nothing more; one that reuses jobs run elsewhere (or before
    jobs recorded their machine) names where they ran."""
    from gpt2lab.compare.report import _jobs_ran_on

    results = json.loads((quick_run / RESULTS).read_text())
    env = results["environment"]
    assert env["jobs_ran_on"] == {env["machine"]: len(list(quick_run.glob("runs/**/job.json")))}
    assert _jobs_ran_on(env) == "" and "Where its jobs ran" not in (quick_run / REPORT).read_text()
    gpu = {"device": "NVIDIA H200", "machine": "NVIDIA H200 (CPU: X)", "jobs_ran_on": {"NVIDIA H200 (CPU: X)": 3}}
    assert _jobs_ran_on(gpu) == ""  # a GPU's jobs record its CPU too
    elsewhere = env | {"jobs_ran_on": {"CPU: another": 3, "not recorded": 2}}
    assert _jobs_ran_on(elsewhere) == (
        "Where its jobs ran, as each recorded its machine: 3 job(s) on CPU: another; 2 job(s) recorded none. "
    )
