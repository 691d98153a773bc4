"""DDP and FSDP as real torchrun processes (gloo on CPU) against one process with the same global batch.

Every run trains the tiny byte-level model for 10 steps on 8 sequences per step, split differently:
single 1 x 8; DDP 2 ranks x 2 micro-steps x 2 (so gradient sync is skipped on one micro-step);
FSDP 2 ranks x 4; two "nodes" of one DDP rank x 4 each. The val set (eval_batches x batch_size
sequences, spread over ranks) is the same 16 sequences in every run.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from dist_worker import byte_corpus, config, masked_targets, metrics, overrides, settings, trajectory

from gpt2lab import checkpoint
from gpt2lab.train import train

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORKER = Path(__file__).with_name("dist_worker.py")
LOSS_ATOL = 1e-5
# Final weights after 10 AdamW steps: the ranks' gradients are summed in another order than one
# process sums its batch (relative noise ~1e-7), and Adam divides by sqrt(v), so for weights whose
# gradient is tiny that noise moves the update by up to ~lr * 1e-3 = 3e-6 a step; 1e-4 bounds 10 steps.
WEIGHT_ATOL = 1e-4
SPLITS = {
    "ddp": {"run.strategy": "ddp", "data.batch_size": 2, "data.grad_accum": 2, "run.eval_batches": 8},
    "fsdp": {"run.strategy": "fsdp", "data.batch_size": 4, "run.eval_batches": 4},
}


@pytest.fixture(scope="module")
def bytes_dir(tmp_path_factory) -> Path:
    return byte_corpus(tmp_path_factory.mktemp("bytes") / "data")


@pytest.fixture(scope="module")
def single(bytes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        train(config(bytes_dir, out))
    finally:
        torch.set_num_threads(threads)
    return out


def torchrun(launcher: list[str], run: dict, env: dict | None = None, wait: bool = True):
    """``python -m torch.distributed.run LAUNCHER dist_worker.py train RUN``; the finished process, or the
    running one when ``wait`` is False."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, str(WORKER), "train", *overrides(run)]
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def standalone(
    bytes_dir: Path, out: Path, strategy: str, env: dict | None = None, extra: dict | None = None, wait: bool = True
):
    """Two ranks on this machine; ``extra``: more settings (``{"run.steps": 12}``)."""
    run = settings(bytes_dir, out, **_dotted(SPLITS[strategy] | (extra or {})))
    return torchrun(["--standalone", "--nproc_per_node=2"], run, env, wait)


def one_error_line(proc) -> tuple[str, str]:
    """(output, error line) of a torchrun that failed with one error line and no frame of ours in a traceback."""
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and len(errors) == 1, output[-3000:]
    assert "gpt2lab/" not in output.replace(str(WORKER), ""), output[-3000:]  # no frame of ours in any traceback
    return output, errors[0]


def _dotted(d: dict) -> dict:
    return {k.replace(".", "__"): v for k, v in d.items()}


def assert_matches(out: Path, single: Path) -> None:
    got, want = metrics(out), metrics(single)
    assert [r["step"] for r in got] == list(range(1, 11))
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=0, atol=LOSS_ATOL)
    val = [[r["val_loss"] for r in m if "val_loss" in r] for m in (got, want)]
    np.testing.assert_allclose(val[0], val[1], rtol=0, atol=LOSS_ATOL)
    a, b = checkpoint.load_model(out), checkpoint.load_model(single)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=WEIGHT_ATOL, msg=name)


@pytest.fixture(scope="module")
def fsdp_run(bytes_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp") / "out"
    proc = standalone(bytes_dir, out, "fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_ddp_matches_one_process_where_batches_score_unevenly(bytes_dir, tmp_path, monkeypatch):
    """With targets ignored unevenly, each rank's and micro-step's mean loss weighs by its share of the
    global batch's scored targets: the same run as one process on the whole batch."""
    from gpt2lab import data

    monkeypatch.setattr(data.Batches, "get", masked_targets(data.Batches.get))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(config(bytes_dir, tmp_path / "single"))
    finally:
        torch.set_num_threads(threads)
    proc = standalone(bytes_dir, tmp_path / "ddp", "ddp", env={"MASK_TARGETS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_matches(tmp_path / "ddp", tmp_path / "single")


def test_ddp_matches_one_process(bytes_dir, single, tmp_path):
    proc = standalone(bytes_dir, tmp_path / "out", "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "strategy ddp x 2" in proc.stderr and "2 micro-step(s) of 2 x 32" in proc.stderr
    assert_matches(tmp_path / "out", single)


def test_fsdp_matches_one_process(fsdp_run, single):
    ckpt = checkpoint.latest(fsdp_run)
    assert checkpoint.read_meta(ckpt)["format"] == "dcp" and (ckpt / "state" / ".metadata").is_file()
    assert_matches(fsdp_run, single)  # load_model reassembles the shards without a process group


def test_fsdp_resume_after_sigkill_during_checkpoint_write_is_exact(bytes_dir, fsdp_run, tmp_path):
    out = tmp_path / "out"
    killed = standalone(bytes_dir, out, "fsdp", env={"KILL_AT_COMMIT": "6"})
    assert killed.returncode != 0
    assert (out / ".tmp-ckpt-00000006" / "state" / ".metadata").is_file()  # shards written, never committed
    assert checkpoint.latest(out).name == "ckpt-00000003"
    resumed = standalone(bytes_dir, out, "fsdp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at step 3" in resumed.stderr
    assert trajectory(out) == trajectory(fsdp_run)
    for p, q in zip(checkpoint.load_model(out).parameters(), checkpoint.load_model(fsdp_run).parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_damaged_sharded_checkpoint_is_a_one_line_error(bytes_dir, fsdp_run, tmp_path):
    """A shard file missing on resume: DCP's CheckpointException (a BaseException, raised on every rank) is
    one error line naming the checkpoint, not a traceback from every rank."""
    out = tmp_path / "out"
    shutil.copytree(fsdp_run, out)
    next((checkpoint.latest(out) / "state").glob("__1_*.distcp")).unlink()
    _, error = one_error_line(standalone(bytes_dir, out, "fsdp", extra={"run.steps": 12}))
    assert "cannot read the sharded checkpoint" in error and "__1_" in error, error


def test_an_error_on_rank_0_alone_stops_every_rank_in_one_line(bytes_dir, fsdp_run, tmp_path):
    """Rank 0 alone prepares the out_dir (metrics.jsonl here, corrupt before its last line): its error is
    raised on every rank, so no other rank dies in a collective with a gloo traceback."""
    out = tmp_path / "out"
    shutil.copytree(fsdp_run, out)
    (out / "metrics.jsonl").write_text("not json\n" + (fsdp_run / "metrics.jsonl").read_text())
    output, error = one_error_line(standalone(bytes_dir, out, "fsdp", extra={"run.steps": 12}))
    assert "metrics.jsonl:1 is not a JSON record" in error and "[rank1]" not in output, output[-3000:]


def test_ctrl_c_under_torchrun_checkpoints_at_once_whatever_the_log_schedule(bytes_dir, tmp_path):
    """The ranks agree on a stop after every step, not at the next logged one (here never: torchrun would
    kill them 30 s after forwarding the signal, with nothing saved)."""
    out = tmp_path / "out"
    never = {"run.steps": 10**6, "run.log_every": 10**6, "run.eval_every": 0, "run.ckpt_every": 0}
    proc = standalone(bytes_dir, out, "ddp", extra=never, wait=False)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "training from step 0" in line:
            break
    time.sleep(2)  # some steps in
    proc.send_signal(signal.SIGINT)
    started = time.perf_counter()
    rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    assert time.perf_counter() - started < 20, output[-3000:]
    assert "stopped at step" in output and checkpoint.latest(out) is not None, output[-3000:]


def test_two_nodes_with_c10d_rendezvous(bytes_dir, single, tmp_path):
    with socket.socket() as s:  # a free port for the rendezvous store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launcher = [
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=127.0.0.1:{port}",
        "--rdzv_id=gpt2lab-test",
    ]
    run = settings(bytes_dir, tmp_path / "out", run__strategy="ddp", data__batch_size=4, run__eval_batches=4)
    nodes = [torchrun(launcher, run, wait=False) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.send_signal(signal.SIGKILL)
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert "strategy ddp x 2" in "".join(outputs)
    assert_matches(tmp_path / "out", single)


def test_ddp_resume_with_dropout_is_exact(bytes_dir, tmp_path):
    """With dropout every rank's random stream decides each step: killed mid-run, resumed, identical."""
    dropout = {**SPLITS["ddp"], "model.dropout": 0.1}
    run = lambda out: torchrun(["--standalone", "--nproc_per_node=2"], settings(bytes_dir, out, **_dotted(dropout)))  # noqa: E731
    reference = run(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "out"
    launcher = ["--standalone", "--nproc_per_node=2"]
    killed = torchrun(launcher, settings(bytes_dir, out, **_dotted(dropout)), env={"KILL_AT_STEP": "7"})
    assert killed.returncode != 0 and checkpoint.latest(out).name == "ckpt-00000006"
    resumed = run(out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert trajectory(out) == trajectory(tmp_path / "reference")


def test_an_error_under_torchrun_is_one_line(tmp_path):
    """Every rank hits the same bad setting: rank 0 prints it once; the others, which print only after a
    pause, are ended by torchrun first (SIGTERM) or exit with the same code; no worker traceback follows
    (torchrun's own failure summary does). Without the pause, rank 1 could fail first and have torchrun
    end rank 0 before it printed: no error line at all."""
    proc = torchrun(["--standalone", "--nproc_per_node=2"], {"run.strategy": "ddp", "data.dir": tmp_path / "missing"})
    output, error = one_error_line(proc)
    assert "data directory" in error, error
    codes = re.findall(r"exitcode\s+:\s+(-?\d+)", output)  # torchrun's summary: one line per rank
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", str(-signal.SIGTERM)}, codes


@pytest.mark.parametrize("good", [True, False])
def test_a_torchrun_training_process_ends_without_the_interpreters_shutdown(bytes_dir, tmp_path, monkeypatch, good):
    """torch keeps a gloo group that DDP, FSDP or distributed checkpointing used, with its worker
    threads, alive past destroy_process_group; one that frees the last collective's tensors while the
    interpreter shuts down aborts a run that succeeded ('terminate called without an active exception',
    seen about once in 10-40 FSDP runs on a loaded 2-core machine). So `gpt2lab train` under torchrun
    (RANK set) ends with os._exit and the run's exit code, its output flushed; without torchrun it
    returns as every command does."""
    from gpt2lab import cli

    run = settings(bytes_dir, tmp_path / "out", **_dotted({"run.steps": 2, "run.eval_every": 2, "run.ckpt_every": 2}))
    if not good:
        run["data.dir"] = tmp_path / "missing"
    argv = ["train", *overrides(run)]
    expected = 0 if good else 2
    assert cli.main(argv) == expected  # no torchrun: a plain return
    monkeypatch.setenv("RANK", "0")
    flushed = []

    class Exited(Exception):
        pass

    def exit_now(code):
        flushed.append(code)
        raise Exited

    monkeypatch.setattr(cli.sys.stdout, "flush", lambda: flushed.append("stdout"))
    monkeypatch.setattr(cli.sys.stderr, "flush", lambda: flushed.append("stderr"))
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    shutil.rmtree(tmp_path / "out", ignore_errors=True)
    with pytest.raises(Exited):
        cli.main(argv)
    assert flushed[-3:] == ["stdout", "stderr", expected]
