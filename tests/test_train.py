"""Training in one process: config, schedule, accumulation, golden losses, overfitting, exact resume,
checkpoints, failure modes, and the train/eval/export/generate commands on a training out_dir."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_worker import (
    SHAKESPEARE,
    TINY_MODEL,
    byte_corpus,
    config,
    losses,
    metrics,
    overrides,
    settings,
    trajectory,
)

from gpt2lab import checkpoint, files
from gpt2lab.cli import main
from gpt2lab.config import GPTConfig
from gpt2lab.data import Source, prepare, write_token_dir
from gpt2lab.errors import CheckpointError, ConfigError, GPT2LabError
from gpt2lab.eval import perplexity
from gpt2lab.load import load_model, save_pretrained
from gpt2lab.model import GPT
from gpt2lab.train import TrainingDiverged, configure_optimizer, lr_at, train
from gpt2lab.train_config import ModelSection, TrainConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and do not stall when other work shares the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bytes_dir(tmp_path_factory) -> Path:
    return byte_corpus(tmp_path_factory.mktemp("bytes") / "data")


@pytest.fixture(scope="module")
def gpt2_tokens_dir(tmp_path_factory) -> Path:
    """The first 60 kB of tiny-shakespeare through ``gpt2lab prepare`` (GPT-2 tokens)."""
    root = tmp_path_factory.mktemp("shk")
    text = root / "shakespeare.txt"
    text.write_bytes(SHAKESPEARE.read_bytes()[:60_000])
    prepare(root / "data", Source([text]), val_fraction=0.1, workers=1, progress=False)
    return root / "data"


@pytest.fixture(scope="module")
def reference(bytes_dir, tmp_path_factory) -> Path:
    """An uninterrupted tiny run, the yardstick of the resume tests."""
    out = tmp_path_factory.mktemp("reference") / "out"
    train(config(bytes_dir, out))
    return out


# --- config --------------------------------------------------------------------------------------


def test_toml_then_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text(
        '[model]\npreset = "debug"\nn_layer = 3\n\n[data]\ndir = "d"\nblock_size = 64\n\n'
        "[optim]\nlr = 1\nwarmup_steps = 0\n\n[run]\nsteps = 5\ncompile = true\n"
    )
    cfg = TrainConfig.load(toml, ["--optim.lr=3e-4", "--run.steps", "7", "--run.peak_tflops=none", "--run.progress"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.run.steps == 7 and cfg.run.compile is True and cfg.run.peak_tflops is None
    model = cfg.model.build()
    assert (model.n_layer, model.n_embd, model.padded_vocab_size) == (3, 64, 50304)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    "args, message",
    [
        (["--optim.lrr=1"], "unknown config key optim.lrr; did you mean 'optim.lr'?"),
        (["--run.lr=1"], "did you mean 'optim.lr'?"),
        (["--rn.steps=1"], "unknown config section 'rn'; did you mean 'run'?"),
        (["--run.steps=ten"], "run.steps must be int"),
        (["--model.n_layer"], "--model.n_layer has no value; give one: --model.n_layer=VALUE"),
        (["--data.dir", "--run.steps=3"], "--data.dir has no value"),
        (["--run.steps", "--run.compile"], "--run.steps has no value"),
        (["--data.global_batch_size=20", "--data.batch_size=8"], "use 16 or 24, or change data.batch_size"),
        (["--data.global_batch_size=16", "--data.grad_accum=2"], "not both"),
        (["--model.preset=debug", "--model.n_head=5"], "pick n_head from"),
        (["--model.init=gpt2", "--model.n_layer=3"], "model.n_layer cannot be set when fine-tuning"),
        (["--optim.warmup_steps=20", "--run.steps=10"], "optim.warmup_steps (20) exceeds run.steps (10)"),
        (["--model.preset=debug", "--data.block_size=256"], "exceeds the model's block_size (128)"),
        (["--run.strategy=deepspeed"], "run.strategy must be one of single, ddp, fsdp"),
        (["--run.dtype=float16"], "use bfloat16"),
        (["--optim.grad_clip=-1"], "optim.grad_clip must be >= 0, got -1.0"),
        (["--run.ckpt_every=-5"], "run.ckpt_every must be >= 0, got -5"),
        (["--run.seed=18446744073709551616"], "run.seed must be below 2**62, got 18446744073709551616"),
    ],
)
def test_config_errors_say_what_to_change(args, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig.load(None, args)


def test_data_and_out_dir_expand_the_home_directory(monkeypatch, tmp_path):
    """No shell expands the ~ of --data.dir=~/x (it follows "="): the config does, as every other path option."""
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = TrainConfig.load(None, ["--data.dir=~/data", "--run.out_dir=~/runs/a"])
    assert (cfg.data.dir, cfg.run.out_dir) == (str(tmp_path / "data"), str(tmp_path / "runs" / "a"))


def test_unknown_toml_key_suggests(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[optim]\nweight_decy = 0.1\n")
    with pytest.raises(ConfigError, match="did you mean 'optim.weight_decay'"):
        TrainConfig.load(toml)


def test_global_batch_must_divide_by_world_size():
    data = TrainConfig.load(None, ["--data.global_batch_size=24", "--data.batch_size=4"]).data
    assert data.accum_steps(1) == 6 and data.accum_steps(2) == 3
    with pytest.raises(ConfigError, match=r"batch_size x world size = 4 x 4 = 16; use 16 or 32"):
        data.accum_steps(4)


def test_model_section_covers_every_gptconfig_field():
    fields = {f.name for f in dataclasses.fields(ModelSection)}
    assert {f.name for f in dataclasses.fields(GPTConfig)} <= fields


# --- optimizer and schedule ----------------------------------------------------------------------


def test_lr_warmup_then_cosine_to_min_lr():
    optim = TrainConfig.load(None, ["--optim.lr=1.0", "--optim.min_lr=0.1", "--optim.warmup_steps=4"]).optim
    lrs = [lr_at(s, optim, 20) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(4, optim, 5) == pytest.approx(0.1)  # one step after the warmup, the last: min_lr
    assert [lr_at(s, optim, 4) for s in range(4)] == lrs[:4]  # a run that ends within its warmup


def fine_tune_one_step(bytes_dir: Path, init: Path, out: Path) -> None:
    """One step of fine-tuning the model in ``init`` into the run ``out``, without warmup or evaluation."""
    train(config(bytes_dir, out, {"model.init": init}, optim__warmup_steps=0, run__steps=1, run__eval_every=0))


def test_a_fine_tune_from_half_precision_weights_trains_in_float32(bytes_dir, reference, tmp_path):
    """docs/training.md: weights and optimizer state stay fp32, whatever dtype the model's file holds."""
    model = checkpoint.load_model(reference).to(torch.bfloat16)
    save_pretrained(model, tmp_path / "hf")
    fine_tune_one_step(bytes_dir, tmp_path / "hf", tmp_path / "ft")
    ckpt = tmp_path / "ft" / "ckpt-00000001"
    weights, optim = (torch.load(ckpt / name, weights_only=True) for name in ("model.pt", "optim.pt"))
    moments = [t for state in optim["state"].values() for t in state.values() if t.dim() > 0]
    assert moments and {t.dtype for t in [*weights.values(), *moments]} == {torch.float32}


def test_a_run_resumes_with_another_dropout(bytes_dir, tmp_path):
    """Dropout is how a model trains, not what it is: a resumed run may change it (docs/training.md)."""
    out = tmp_path / "out"
    train(config(bytes_dir, out, run__steps=3, run__eval_every=0))
    train(config(bytes_dir, out, {**TINY_MODEL, "model.dropout": 0.1}, run__steps=4, run__eval_every=0))
    assert checkpoint.load_model(out).config.dropout == 0.1
    with pytest.raises(CheckpointError, match="holds a different model: n_layer=2 there but 3"):
        train(config(bytes_dir, out, {**TINY_MODEL, "model.n_layer": 3}, run__steps=5, run__eval_every=0))


def test_the_rng_state_a_checkpoint_keeps_is_its_devices(monkeypatch):
    """On a GPU, the generator of the device the run trains on (cuda:1 in a single process), not the
    current device's; none on the CPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": calls.append(device) or torch.zeros(8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(device))
    state = checkpoint.rng_state(torch.device("cuda:1"))
    checkpoint.set_rng_state(state, torch.device("cuda:1"))
    assert calls == [torch.device("cuda:1")] * 2
    calls.clear()
    assert "cuda" not in checkpoint.rng_state(torch.device("cpu")) and calls == []


class _Fixed:
    """A batch source of given micro-batches: ``grad_accum`` of them a step, the same every step."""

    def __init__(self, micro_batches):
        self.micro_batches, self.grad_accum = micro_batches, len(micro_batches)

    def get(self, step, micro_step=0):
        return self.micro_batches[micro_step]


def _scored_unevenly(rows: int = 4, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences whose targets are mostly ignored (-100) in the first half of the rows, scored in the rest."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (rows, T), generator=g), torch.randint(0, 256, (rows, T), generator=g)
    y[: rows // 2, 2:] = -100
    return x, y


def test_accumulation_equals_one_batch_where_micro_batches_score_unevenly():
    """The step's gradient is that of the mean over every scored target, however the batch is split into
    micro-steps: one scoring 4 targets weighs less than one scoring 32 (a mean of the micro-steps' means
    would weigh them alike). The loss it returns, over grad_accum, is that mean."""
    from gpt2lab.distributed import init
    from gpt2lab.train import train_step

    x, y = _scored_unevenly()
    env, amp, results = init("single", "cpu"), torch.autocast("cpu", enabled=False), []
    for split in ([(x, y)], [(x[:2], y[:2]), (x[2:], y[2:])]):
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_name("debug", vocab_size=256, n_layer=1))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the step moves each weight by its gradient
        loss, _ = train_step(model, optimizer, _Fixed(split), 0, amp, 0.0, env)
        results.append((loss.item() / len(split), [p.detach().clone() for p in model.parameters()]))
    (loss_one, after_one), (loss_two, after_two) = results
    assert loss_two == pytest.approx(loss_one, rel=1e-6)
    for a, b in zip(after_one, after_two, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_evaluation_is_the_mean_over_scored_targets():
    from gpt2lab.distributed import init
    from gpt2lab.train import evaluate

    x, y = _scored_unevenly()
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name("debug", vocab_size=256, n_layer=1))
    env, amp = init("single", "cpu"), torch.autocast("cpu", enabled=False)
    with torch.no_grad():
        want = model(x, y)[1].item()  # one batch: the mean over its scored targets
    got = evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])], env, amp)
    assert got == pytest.approx(want, rel=1e-6) and model.training


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig.from_name("debug", vocab_size=256))
    opt = configure_optimizer(model, TrainConfig().optim)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()  # tied once


# --- the loop ------------------------------------------------------------------------------------


def test_grad_accumulation_equals_one_big_batch(bytes_dir, tmp_path):
    big = train(config(bytes_dir, tmp_path / "big", data__batch_size=16, run__steps=4, run__eval_every=0))
    small = train(
        config(bytes_dir, tmp_path / "acc", data__batch_size=4, data__grad_accum=4, run__steps=4, run__eval_every=0)
    )
    np.testing.assert_allclose(losses(tmp_path / "acc"), losses(tmp_path / "big"), rtol=0, atol=1e-5)
    a, b = checkpoint.load_model(small.checkpoint), checkpoint.load_model(big.checkpoint)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-5, msg=name)  # 4 AdamW steps of ~1e-7 sum-order noise


# Regenerate after a deliberate change to init, data order or the loss with:
#   pytest tests/test_train.py -k golden   (the failure message prints the new values)
GOLDEN_LOSSES = [10.80961799621582, 10.767682075500488, 10.719698905944824]  # ln(50257) = 10.825


@pytest.fixture(scope="module")
def golden_run(gpt2_tokens_dir, tmp_path_factory) -> Path:
    """3 steps of the debug preset (GPT-2 vocabulary) on GPT-2 tokens, a checkpoint after each."""
    out = tmp_path_factory.mktemp("golden") / "out"
    debug = {"model.preset": "debug"}
    train(
        config(
            gpt2_tokens_dir,
            out,
            debug,
            data__batch_size=4,
            optim__lr=1e-3,
            optim__warmup_steps=1,
            run__steps=3,
            run__eval_every=0,
            run__ckpt_every=1,
        )
    )
    return out


def test_golden_first_losses(golden_run):
    got = losses(golden_run)
    np.testing.assert_allclose(got, GOLDEN_LOSSES, rtol=0, atol=1e-4, err_msg=f"new values: {got!r}")


def test_tiny_model_overfits_one_batch(tmp_path):
    text = np.frombuffer(SHAKESPEARE.read_bytes()[:33], dtype=np.uint8)
    data = write_token_dir(tmp_path / "data", {"train": text, "val": text}, 256)  # every batch: the same sequence
    cfg = config(
        data,
        tmp_path / "out",
        data__batch_size=2,
        optim__lr=1e-2,
        optim__min_lr=0,
        optim__weight_decay=0,
        optim__warmup_steps=5,
        run__steps=60,
        run__log_every=10,
        run__eval_every=0,
        run__ckpt_every=0,
    )
    result = train(cfg)
    assert losses(tmp_path / "out")[0] > 2.0
    assert result.loss < 0.05


def test_metrics_and_checkpoints(reference):
    records = metrics(reference)
    assert [r["step"] for r in records] == list(range(1, 11))
    assert set(records[0]) >= {"step", "loss", "lr", "tokens", "tokens_per_s", "grad_norm"}
    assert records[9]["tokens"] == 10 * 8 * 32
    assert [r["step"] for r in records if "val_loss" in r] == [5, 10]
    assert math.isclose(records[4]["val_ppl"], math.exp(records[4]["val_loss"]))
    assert [p.name for p in checkpoint.complete_checkpoints(reference)] == [
        "ckpt-00000006",
        "ckpt-00000009",
        "ckpt-00000010",
    ]  # keep_last=3 removed ckpt-3
    ckpt = reference / "ckpt-00000010"
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    assert (meta["step"], meta["format"], meta["world_size"]) == (10, "full", 1)
    for name in ("model.pt", "optim.pt", "rng.pt"):
        torch.load(ckpt / name, weights_only=True)
    assert not list(reference.glob(".tmp-*"))


def test_ctrl_c_stops_at_a_step_boundary_and_resume_is_exact(bytes_dir, reference, tmp_path, monkeypatch):
    from gpt2lab import data

    get = data.Batches.get

    def interrupting_get(self, step, micro_step=0):
        if step == 4:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C would, in the middle of step 4 (0-based)
        return get(self, step, micro_step)

    monkeypatch.setattr(data.Batches, "get", interrupting_get)
    with pytest.raises(KeyboardInterrupt):
        train(config(bytes_dir, tmp_path / "out"))
    assert checkpoint.latest(tmp_path / "out").name == "ckpt-00000005"  # step 4 finished, then saved
    monkeypatch.setattr(data.Batches, "get", get)
    train(config(bytes_dir, tmp_path / "out"))
    assert trajectory(tmp_path / "out") == trajectory(reference)


def test_ctrl_c_in_the_last_step_finishes_the_run(bytes_dir, tmp_path, monkeypatch):
    """A stop asked for during the last step ends a finished run: its checkpoint, its result, no
    interruption (exit status 130) and no "run the same command again"."""
    from gpt2lab import data

    get = data.Batches.get

    def interrupting_get(self, step, micro_step=0):
        if step == 2:
            signal.raise_signal(signal.SIGINT)  # in the middle of the last of 3 steps
        return get(self, step, micro_step)

    monkeypatch.setattr(data.Batches, "get", interrupting_get)
    result = train(config(bytes_dir, tmp_path / "out", run__steps=3, run__eval_every=0))
    assert result is not None and checkpoint.latest(tmp_path / "out").name == "ckpt-00000003"


def test_a_vocabulary_an_earlier_run_left_does_not_outlive_it(bytes_dir, tmp_path):
    """A run on compact-vocabulary data killed before its first checkpoint leaves vocabulary.json; a new
    run there on other ids removes it, else every later read of the run (resume, eval, generate) would
    read its ids through that vocabulary."""
    from gpt2lab.tokenizer import VOCABULARY_JSON

    out = tmp_path / "out"
    out.mkdir()
    (out / VOCABULARY_JSON).write_text('{"left": "by a killed run"}')
    train(config(bytes_dir, out, optim__warmup_steps=0, run__steps=1, run__eval_every=0))
    assert not (out / VOCABULARY_JSON).exists()


def test_sigkill_during_checkpoint_write_then_resume_is_exact(bytes_dir, reference, tmp_path):
    out = tmp_path / "out"
    worker = Path(__file__).with_name("dist_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), "train", *overrides(settings(bytes_dir, out))],
        env=os.environ | {"KILL_AT_COMMIT": "6"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / ".tmp-ckpt-00000006" / "checkpoint.json").is_file()  # fully written, never committed
    assert checkpoint.latest(out).name == "ckpt-00000003"
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]
    train(config(bytes_dir, out))
    assert trajectory(out) == trajectory(reference)
    assert not list(out.glob(".tmp-*"))


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(bytes_dir, tmp_path, monkeypatch):
    forward = GPT.forward
    calls = []

    def poisoned_forward(self, idx, targets=None, input_pos=None):
        logits, loss = forward(self, idx, targets, input_pos)
        if self.training:
            calls.append(1)
            if len(calls) == 5:  # step 5 (1-based)
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned_forward)
    with pytest.raises(TrainingDiverged, match=r"NaN/inf by step 5 .*ckpt-00000003, is kept"):
        train(config(bytes_dir, tmp_path / "out", run__ckpt_every=3))
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path / "out")] == ["ckpt-00000003"]
    assert all(math.isfinite(x) for x in losses(tmp_path / "out"))
    monkeypatch.setattr(GPT, "forward", forward)
    assert torch.isfinite(checkpoint.load_model(tmp_path / "out").wte.weight).all()


def test_checkpoint_of_another_model_is_refused(bytes_dir, tmp_path):
    train(config(bytes_dir, tmp_path / "out", run__steps=2, run__eval_every=0))
    with pytest.raises(CheckpointError, match=r"n_layer=2 there but 3 in this config"):
        train(config(bytes_dir, tmp_path / "out", model__n_layer=3, run__steps=4, run__eval_every=0))


def test_resume_applies_changed_optimizer_settings(bytes_dir, tmp_path):
    train(config(bytes_dir, tmp_path / "out", run__steps=2, run__eval_every=0))
    train(config(bytes_dir, tmp_path / "out", run__steps=3, run__eval_every=0, optim__weight_decay=0.5))
    groups = torch.load(tmp_path / "out" / "ckpt-00000003" / "optim.pt", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]


def test_finished_run_is_not_trained_again(bytes_dir, reference, capsys):
    result = train(config(bytes_dir, reference, optim__lr=1e-3))
    assert result.step == 10 and result.loss is None
    assert len(metrics(reference)) == 10
    err = capsys.readouterr().err
    assert "settings changed since the checkpoint: optim.lr 0.003 -> 0.001" in err and "nothing to do" in err


def _copy_recording(run_dir: Path, out: Path, **fields) -> Path:
    """A copy of a finished 10-step run whose last checkpoint records other ``fields`` (world_size, format)."""
    shutil.copytree(run_dir, out)
    record = out / "ckpt-00000010" / "checkpoint.json"
    record.write_text(json.dumps(json.loads(record.read_text()) | fields))
    return out


def test_resuming_with_another_world_size_says_so(bytes_dir, reference, tmp_path, capsys):
    """A checkpoint of 2 ranks resumed by one process: without data.global_batch_size the global batch
    halves, which the start line says with the fix."""
    out = _copy_recording(reference, tmp_path / "out", world_size=2)
    capsys.readouterr()
    train(config(bytes_dir, out, run__steps=11, run__eval_every=0))
    err = capsys.readouterr().err
    assert "world size 2 -> 1 (the global batch with it: set data.global_batch_size to keep it)" in err, err


def test_tokens_count_on_across_a_resume_with_another_batch(bytes_dir, reference, tmp_path):
    """metrics.jsonl's tokens are those trained so far: 10 steps of 8 x 32, then 2 of 4 x 32."""
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    train(config(bytes_dir, out, run__steps=12, data__batch_size=4, run__eval_every=0))
    tokens = {r["step"]: r["tokens"] for r in metrics(out)}
    assert (tokens[10], tokens[11], tokens[12]) == (2560, 2560 + 128, 2560 + 256)


def test_a_checkpoint_of_another_kind_of_strategy_is_refused_before_a_model_is_built(
    bytes_dir, reference, tmp_path, monkeypatch
):
    """An FSDP (sharded) checkpoint does not resume in a single process: refused at once, with what to do."""
    from gpt2lab import train as train_module

    out = _copy_recording(reference, tmp_path / "out", format="dcp")

    def never(*args):
        raise AssertionError("a model was built")

    monkeypatch.setattr(train_module, "build_model", never)
    with pytest.raises(
        CheckpointError, match="written with run.strategy=fsdp and cannot resume under run.strategy=single"
    ):
        train(config(bytes_dir, out, run__steps=11))


def test_fine_tune_starts_from_the_given_weights(bytes_dir, reference, tmp_path):
    assert main(["export", "--model", str(reference), "--out", str(tmp_path / "hf")]) == 0
    fine_tune_one_step(bytes_dir, tmp_path / "hf", tmp_path / "ft")
    base = load_model(tmp_path / "hf")
    from gpt2lab.data import Batches, TokenData

    x, y = Batches(TokenData(bytes_dir, "train"), 8, 32, seed=0).get(0)
    with torch.no_grad():
        expected = base(x, y)[1].item()
    assert losses(tmp_path / "ft")[0] == pytest.approx(expected, abs=1e-6)


def test_a_fine_tune_resumes_without_its_base_model(bytes_dir, reference, tmp_path):
    """The checkpoint holds every weight: a fine-tune resumes once its base model is gone (moved, deleted,
    a hub name offline), and gives what the run gives without the interruption."""
    import shutil

    assert main(["export", "--model", str(reference), "--out", str(tmp_path / "hf")]) == 0
    ft = {"model.init": tmp_path / "hf"}
    settings = dict(optim__warmup_steps=0, run__steps=3, run__ckpt_every=1, run__eval_every=0)
    train(config(bytes_dir, tmp_path / "whole", ft, **settings))
    train(config(bytes_dir, tmp_path / "ft", ft, **settings))
    for later in ("ckpt-00000002", "ckpt-00000003"):  # as if stopped after step 1
        shutil.rmtree(tmp_path / "ft" / later)
    shutil.rmtree(tmp_path / "hf")
    train(config(bytes_dir, tmp_path / "ft", ft, **settings))
    assert checkpoint.latest(tmp_path / "ft").name == "ckpt-00000003"
    assert trajectory(tmp_path / "ft") == trajectory(tmp_path / "whole")


def test_fine_tune_may_change_rope_interpolation(bytes_dir, tmp_path):
    """Position interpolation is fine-tuned into a rotary model: model.rope_interpolation may change when
    fine-tuning (no other architecture field may), and the trained checkpoint records it."""
    rope = {**TINY_MODEL, "model.pos_emb": "rope"}
    train(config(bytes_dir, tmp_path / "base", rope, optim__warmup_steps=0, run__steps=1, run__eval_every=0))
    ft = {"model.init": tmp_path / "base", "model.rope_interpolation": 0.5}
    train(
        config(
            bytes_dir, tmp_path / "pi", ft, data__block_size=128, optim__warmup_steps=0, run__steps=1, run__eval_every=0
        )
    )
    assert checkpoint.load_model(tmp_path / "pi").config.rope_interpolation == 0.5
    with pytest.raises(ConfigError, match="only model.dropout and model.rope_interpolation may change"):
        config(bytes_dir, tmp_path / "bad", {"model.init": tmp_path / "base", "model.n_kv_head": 1})


def test_extra_evaluations_land_in_the_metrics(bytes_dir, tmp_path):
    """TrainData.evaluations adds its fields to the record of every evaluation, with the model in eval mode."""
    from gpt2lab.data import Batches, TokenData, val_batches
    from gpt2lab.train import TrainData

    seen_modes = []

    def evaluations(model) -> dict:
        seen_modes.append(model.training)
        return {"probe": float(len(seen_modes))}

    def data(env, accum):
        train_split, val_split = TokenData(bytes_dir, "train"), TokenData(bytes_dir, "val")
        return TrainData(Batches(train_split, 8, 32, accum), val_batches(val_split, 8, 32, 2), 256,
                         evaluations=evaluations)  # fmt: skip

    train(config(bytes_dir, tmp_path / "run", run__steps=4, run__eval_every=2, run__log_every=1), data)
    records = metrics(tmp_path / "run")
    assert [(r["step"], r.get("probe")) for r in records] == [(1, None), (2, 1.0), (3, None), (4, 2.0)]
    assert seen_modes == [False, False]


# --- commands on a training out_dir --------------------------------------------------------------


def test_generate_and_export_use_the_newest_checkpoint(golden_run, tmp_path, capsys):
    """A run's directory names its newest checkpoint (ckpt-3 of ckpt-1, -2 and -3) to generate and export."""
    assert [p.name for p in checkpoint.complete_checkpoints(golden_run)] == [f"ckpt-0000000{i}" for i in (1, 2, 3)]
    args = ["--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "0"]
    texts = []
    for source in (golden_run, golden_run / "ckpt-00000003", golden_run / "ckpt-00000001"):
        assert main(["generate", "--model", str(source), *args]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2] and texts[0].startswith("ROMEO:")
    assert main(["export", "--model", str(golden_run), "--out", str(tmp_path / "hf")]) == 0
    exported = load_model(tmp_path / "hf")
    said = f"exported {golden_run} (ckpt-00000003) ({exported.num_params():,} parameters) to {tmp_path / 'hf'}"
    assert capsys.readouterr().out.strip() == said  # the checkpoint taken, the parameters written
    newest, oldest = (checkpoint.load_model(golden_run / f"ckpt-0000000{i}") for i in (3, 1))
    assert exported.config.padded_vocab_size == 50257 and newest.config.padded_vocab_size == 50304
    x = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(exported(x)[0], newest(x)[0], rtol=0, atol=1e-6)
        assert not torch.allclose(exported(x)[0], oldest(x)[0], rtol=0, atol=1e-4)
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:1000])
    capsys.readouterr()
    for source in (golden_run, tmp_path / "hf"):  # the HF-format directory scores the same
        assert main(["eval", "--model", str(source), "--data", str(text), "--block-size", "32"]) == 0
    ours, hf = capsys.readouterr().out.splitlines()
    assert ours == hf and "perplexity" in ours


def test_eval_of_a_text_file_and_a_prepared_dir(golden_run, gpt2_tokens_dir, tmp_path, capsys):
    from gpt2lab.tokenizer import load_tokenizer

    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:2000])
    assert main(["eval", "--model", str(golden_run), "--data", str(text), "--block-size", "32", "--stride", "32"]) == 0
    printed = capsys.readouterr().out
    model = checkpoint.load_model(golden_run).eval()
    ids = torch.tensor(load_tokenizer().encode_ordinary(text.read_text()))
    with torch.no_grad():  # non-overlapping windows: the plain mean loss over consecutive chunks
        chunks = [ids[i : i + 33] for i in range(0, len(ids) - 1, 32)]
        nll = sum(model(c[None, :-1], c[None, 1:])[1].item() * (len(c) - 1) for c in chunks)
    loss, n = perplexity(model, ids.numpy(), 32, 32, progress=False)
    assert n == len(ids) - 1 and loss == pytest.approx(nll / n, rel=1e-5)
    assert f"{n:,} tokens scored (block 32, stride 32): loss {loss:.4f}" in printed
    assert perplexity(model, ids.numpy(), 32, 8, progress=False)[1] == n  # a stride scores each token once too
    assert main(["eval", "--model", str(golden_run), "--data", str(gpt2_tokens_dir), "--block-size", "32"]) == 0
    assert "stride 16" in capsys.readouterr().out
    text.write_text("Hello world")  # two tokens: one scored
    assert main(["eval", "--model", str(golden_run), "--data", str(text)]) == 0
    assert capsys.readouterr().out.startswith("1 token scored (")
    one = write_token_dir(tmp_path / "one", {"train": np.arange(100), "val": np.array([5])}, 50257)
    assert main(["eval", "--model", str(golden_run), "--data", str(one)]) == 2
    assert f"the val split of {one} has 1 token(s); scoring needs at least 2" in capsys.readouterr().err


def test_bits_per_byte_of_a_prepared_dir_count_the_text_of_the_scored_tokens(golden_run, gpt2_tokens_dir):
    """Every token but the first is scored: bits per byte divide by their bytes exactly, as for a text file
    (not the split's bytes less an average token's)."""
    from gpt2lab.data import TokenData
    from gpt2lab.eval import score_path
    from gpt2lab.tokenizer import load_tokenizer, token_byte_lengths

    tok = load_tokenizer()
    data = TokenData(gpt2_tokens_dir, "val")
    tokens = data.read(0, len(data))
    score, _, _ = score_path(checkpoint.load_model(golden_run).eval(), tok, gpt2_tokens_dir, 32, progress=False)
    assert score.bytes == int(token_byte_lengths(tok)[tokens[1:]].sum())


def test_eval_defaults_to_a_rotary_models_training_length(make_gpt, tmp_path):
    """A rotary model runs past its block_size, but its loss rises there: eval's window defaults to it."""
    from gpt2lab.eval import score_path
    from gpt2lab.tokenizer import load_tokenizer

    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:3000])
    model = make_gpt(vocab_size=50257, block_size=48, pos_emb="rope")
    assert score_path(model, load_tokenizer(), text, progress=False)[1:] == (48, 24)


def test_eval_of_a_training_run_defaults_to_the_length_it_trained_at(bytes_dir, tmp_path, capsys):
    """A run of a 64-position model trained on 32-token sequences: its out_dir and its checkpoints are
    scored in windows of 32 by default (positions past 32 were never trained); a model directory, which
    records no training length, in windows of its context."""
    out = tmp_path / "out"
    train(config(bytes_dir, out, run__steps=2, run__eval_every=0, run__ckpt_every=0))
    for model in (out, out / "ckpt-00000002"):
        assert main(["eval", "--model", str(model), "--data", str(bytes_dir)]) == 0
        assert "(block 32, stride 16)" in capsys.readouterr().out
    assert main(["export", "--model", str(out), "--out", str(tmp_path / "hf")]) == 0
    assert main(["eval", "--model", str(tmp_path / "hf"), "--data", str(bytes_dir)]) == 0
    assert "(block 64, stride 32)" in capsys.readouterr().out


def test_perplexity_is_exp_of_the_loss_until_a_float_overflows():
    from gpt2lab.eval import Score

    assert Score(250.0, 10).perplexity == pytest.approx(math.exp(250.0))
    assert Score(800.0, 10).perplexity == math.inf
    assert "perplexity 3.746e+108" in str(Score(250.0, 10))
    assert math.isnan(Score(math.nan, 10).perplexity)


# --- errors through the CLI ------------------------------------------------------------------------


def run_cli(args, capsys) -> str:
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    return err


def test_cli_bad_inputs(bytes_dir, tmp_path, capsys):
    args = ["train", *overrides(settings(bytes_dir, tmp_path / "out"))]
    assert "did you mean 'optim.lr'" in run_cli([*args, "--optim.lrr=1"], capsys)
    assert "data directory" in run_cli([*args, f"--data.dir={tmp_path / 'missing'}"], capsys)
    empty = write_token_dir(tmp_path / "empty", {"train": np.zeros(0), "val": np.zeros(0)}, 256)
    assert "has 0 tokens" in run_cli([*args, f"--data.dir={empty}"], capsys)
    assert "not a multiple of data.batch_size" in run_cli([*args, "--data.global_batch_size=12"], capsys)
    assert "needs the torchrun launcher" in run_cli([*args, "--run.strategy=ddp"], capsys)


def test_cli_huge_learning_rate_diverges_cleanly(bytes_dir, tmp_path, capsys):
    args = overrides(settings(bytes_dir, tmp_path / "out", optim__lr=1e30, optim__min_lr=0))
    err = run_cli(["train", *args], capsys)
    assert err.splitlines()[-1].startswith("error: the loss or gradient norm became NaN/inf")
    assert "No checkpoint had been saved yet" in err
    assert "no complete checkpoint" in run_cli(["generate", "--model", str(tmp_path / "out"), "--prompt", "x"], capsys)


# --- what a crash, a full disk or a second run must not break --------------------------------------


def test_grad_accumulation_averages_the_gradient(bytes_dir, tmp_path):
    """Accumulated micro-steps give the big batch's gradient, not its sum (AdamW and clipping would hide
    a constant factor in the weights; the logged gradient norm does not)."""
    run = dict(run__steps=3, run__eval_every=0, optim__grad_clip=0)
    train(config(bytes_dir, tmp_path / "big", data__batch_size=16, **run))
    train(config(bytes_dir, tmp_path / "acc", data__batch_size=4, data__grad_accum=4, **run))
    big, acc = metrics(tmp_path / "big"), metrics(tmp_path / "acc")
    np.testing.assert_allclose([r["grad_norm"] for r in acc], [r["grad_norm"] for r in big], rtol=1e-4)


def test_exact_resume_with_dropout(bytes_dir, tmp_path):
    """With dropout the random streams decide every step: a run killed mid-way resumes exactly."""
    dropout = {**TINY_MODEL, "model.dropout": 0.1}
    reference = tmp_path / "reference"
    train(config(bytes_dir, reference, dropout))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("dist_worker.py")),
            "train",
            *overrides(settings(bytes_dir, out, dropout)),
        ],
        env=os.environ | {"KILL_AT_STEP": "7"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoint.latest(out).name == "ckpt-00000006"
    train(config(bytes_dir, out, dropout))
    assert trajectory(out) == trajectory(reference)


def test_a_second_run_on_the_same_directory_is_refused(bytes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    with files.locked(out, "training run"):
        err = run_cli(["train", *overrides(settings(bytes_dir, out))], capsys)
    assert f"in use by another training run (pid {os.getpid()})" in err and err.count("\n") == 1
    assert not (out / "metrics.jsonl").exists()  # the refused run wrote nothing
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from gpt2lab import files; import os, pathlib\n"
         f"with files.locked(pathlib.Path({str(out)!r})): os.kill(os.getpid(), 9)"]
    )  # fmt: skip
    assert holder.wait(timeout=60) == -signal.SIGKILL  # it took the lock, then died holding it
    train(config(bytes_dir, out, run__steps=2, run__eval_every=0))  # a killed holder leaves no stale lock


def test_a_run_refused_before_it_wrote_anything_leaves_no_directory(bytes_dir, tmp_path, capsys):
    """The run directory is made to be locked; a run then refused (here: no such data) removes it again,
    lock file and all, but never a directory that was there before."""
    out = tmp_path / "new" / "out"
    argv = ["train", *overrides(settings(tmp_path / "no-data", out))]
    assert "no-data does not exist" in run_cli(argv, capsys)
    assert not out.exists() and (tmp_path / "new").is_dir()
    out.mkdir()
    assert "no-data does not exist" in run_cli(argv, capsys)
    assert out.is_dir()


def test_tensorboard_without_its_package_is_refused_before_any_work(bytes_dir, tmp_path, capsys, monkeypatch):
    import sys

    import gpt2lab.train

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package imports as
    monkeypatch.setattr(gpt2lab.train, "load_data", lambda *a: pytest.fail("data loaded before the check"))
    out = tmp_path / "out"
    err = run_cli(["train", *overrides(settings(bytes_dir, out, run__tensorboard="true"))], capsys)
    assert "run.tensorboard needs the tensorboard package: pip install tensorboard" in err and not out.exists()


def test_resume_drops_a_torn_metrics_record(bytes_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train(config(bytes_dir, out, run__steps=4, run__ckpt_every=2, run__eval_every=0))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.7')  # the power went off mid-record
    train(config(bytes_dir, out, run__steps=6, run__ckpt_every=2, run__eval_every=0))
    assert "dropped a last record cut off by a crash" in capsys.readouterr().err
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5, 6]


def test_a_metrics_line_that_is_json_but_not_a_record_is_corruption(tmp_path):
    """A line written by hand as a JSON list or number is not a record a crash tears: an error naming the
    line, not an AttributeError where the record is read."""
    from gpt2lab import files

    metrics_file = tmp_path / "metrics.jsonl"
    metrics_file.write_text('[1, 2]\n{"step": 1}\n')
    with pytest.raises(GPT2LabError, match=r"metrics.jsonl:1 is not a JSON record \(an object\)"):
        files.read_jsonl(metrics_file)


def test_nothing_to_do_leaves_the_run_as_it_was(bytes_dir, reference):
    before = {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()}
    train(config(bytes_dir, reference, optim__lr=1e-3))
    assert {p.name: p.read_bytes() for p in reference.iterdir() if p.is_file()} == before


WIDE = {**TINY_MODEL, "model.n_embd": 192, "model.n_head": 4}  # ~1 M parameters: a 12 MB checkpoint


def test_full_disk_is_one_clear_error_and_loses_nothing(bytes_dir, tmp_path, capsys, monkeypatch):
    """A checkpoint write that runs out of space: one line naming the device and the file, the partial
    checkpoint removed, the previous one intact, and the run resumable once there is room."""
    out = tmp_path / "out"
    train(config(bytes_dir, out, WIDE, run__steps=3, run__ckpt_every=3, run__eval_every=0))
    before = {p: p.read_bytes() for p in (out / "ckpt-00000003").iterdir()}
    save = torch.save

    def save_until_full(obj, f, *args, **kwargs):
        f.write(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_full)
    args = overrides(settings(bytes_dir, out, WIDE, run__steps=6, run__ckpt_every=3, run__eval_every=0))
    err = run_cli(["train", *args], capsys).splitlines()[-1]  # after the start line: one error line
    assert err.startswith("error: no space left on ") and "ckpt-00000006" in err and "need about" in err
    assert not list(out.glob(".tmp-*")) and [p.name for p in checkpoint.complete_checkpoints(out)] == ["ckpt-00000003"]
    assert {p: p.read_bytes() for p in (out / "ckpt-00000003").iterdir()} == before
    monkeypatch.setattr(torch, "save", save)
    train(config(bytes_dir, out, WIDE, run__steps=6, run__ckpt_every=3, run__eval_every=0))
    assert checkpoint.latest(out).name == "ckpt-00000006"


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs, where the machine lets this process mount one (root in a container that allows it)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here; test_full_disk_is_one_clear_error_and_loses_nothing covers the logic")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_really_full_disk(bytes_dir, small_disk, tmp_path, capsys):
    """The same on a real 16 MB file system: the first checkpoint fits, the second does not; then the
    rerun, export and prepare onto the full disk each fail with one line, and nothing is left behind."""
    out = small_disk / "out"
    args = overrides(
        settings(bytes_dir, out, WIDE, run__steps=4, run__ckpt_every=2, run__keep_last=5, run__eval_every=0)
    )
    err = run_cli(["train", *args], capsys).splitlines()[-1]
    assert err.startswith(f"error: no space left on {small_disk}") and "ckpt-00000004" in err, err
    assert [p.name for p in checkpoint.complete_checkpoints(out)] == ["ckpt-00000002"] and not list(out.glob(".tmp-*"))
    assert checkpoint.load_model(out).config.n_embd == 192  # the checkpoint that fitted is whole
    text, data = tmp_path / "text.txt", small_disk / "data"
    text.write_bytes(SHAKESPEARE.read_bytes())
    assert main(["prepare", "--input", str(text), "--out", str(data), "--workers", "1"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    with open(small_disk / "filler", "wb") as f, contextlib.suppress(OSError):  # take what space is left
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    err = run_cli(["export", "--model", str(out), "--out", str(small_disk / "hf")], capsys)
    assert err.startswith(f"error: no space left on {small_disk}") and "need about" in err
    err = run_cli(["prepare", "--input", str(text), "--out", str(data), "--workers", "1"], capsys).splitlines()[-1]
    assert err == f"error: no space left on {small_disk} writing {data}; free some space and run the same command again"
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    assert not [p for p in small_disk.rglob("*") if p.name.startswith(".tmp") or ".tmp-" in p.name]
