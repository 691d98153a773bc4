"""gpt2lab against the CPU inference engines users pick for speed: CTranslate2 and llama.cpp.

    pip install -e ".[bench]"        # ctranslate2, transformers (CTranslate2's converter reads with it), gguf
    python bench/peers.py [--threads 2] [--repeat 5] [--only decode,prefill,forward,quality] [--quick] [--compile]
                          [--decode float32:1:128,int8:8:128] [--llama-convert PATH/TO/llama.cpp/convert_hf_to_gguf.py]

One random-weight GPT-2 124M, written once by gpt2lab's ``save_pretrained``; each peer's own converter
reads that directory as it is: CTranslate2's ``TransformersConverter`` (float32, and int8 =
compute_type "int8"), llama.cpp's ``convert_hf_to_gguf.py`` (f32 and q8_0). llama.cpp, through
llama-cpp-python, is optional: it needs a long source build, and its converter ships with llama.cpp's
sources, not with the wheel; rows without it say so. Every engine runs on ``--threads`` threads,
each peer in a process of its own (gpt2lab in this one): once CTranslate2 had run in gpt2lab's
process, gpt2lab ran slower there.

Each row times gpt2lab and one peer in alternation (gpt2lab, peer, gpt2lab, peer, ...) and reports the
peer's time over gpt2lab's, pair by pair: the median and the range (above 1: gpt2lab is faster). Greedy
rows generate exactly N new tokens after a 16-token prompt (no early stop) and check that the tokens
agree; prefill rows run a 256-token prompt to its first new token (float32 and 8-bit); forward rows
compute the logits of every position (both repeat one shape and are timed after ``REPEATED_WARMUP``
warm-up calls of each engine, bench/common.py). With ``--compile`` every greedy row runs a second time
with ``compile=True``: the compiled decode step, timed against the eager one on its first steps, the
faster kept (the compile line says which). A decode row also states each engine's decode speed as a
fraction of the memory read rate: the bytes of weights one step reads times steps per second, over the
rate at which torch reads a 1 GiB matrix, the fastest here of a sum and the one-row products of MKL and
oneDNN (``common.read_probe``; in 2 MiB pages where the steps' weights are), timed in the same alternation. The 8-bit quality rows compare each
8-bit engine's logits with gpt2lab's float32 logits on 8 x 256 random tokens.

Every engine runs with the OpenMP wait policy gpt2lab's command line would choose (gpt2lab.cli's
``openmp_wait_policy``: the runtimes' default, threads that spin briefly, unless the CPU is already
busy); the header says which. Set OMP_WAIT_POLICY yourself to choose it.
"""

from __future__ import annotations

import os

from gpt2lab.cli import openmp_wait_policy

openmp_wait_policy(os.environ)  # before any OpenMP runtime loads: each reads the environment once
import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import (  # noqa: E402
    REPEATED_WARMUP,
    cpu_header,
    decode_bytes,
    memory_read_gbs,
    names_of,
    positive_int,
    read_probe,
)

from gpt2lab import GPT, GPTConfig, generate, save_pretrained  # noqa: E402
from gpt2lab.config import PRESETS  # noqa: E402
from gpt2lab.decode import faster_step, prepacks_weights  # noqa: E402
from gpt2lab.kernels import alternated  # noqa: E402
from gpt2lab.quantize import quantize_int8  # noqa: E402

PROMPT = 16
CONTEXT = 1024  # the model's block_size
ROWS: list[str] = []


def paired(ours, peer, repeat: int, probe=None, warmup: int = 1) -> dict[str, list[float]]:
    """Times of ``ours`` and ``peer`` (and of the bandwidth probe), run in turn ``repeat`` times after
    ``warmup`` calls of each."""
    return alternated({"ours": ours, "peer": peer} | ({"probe": probe} if probe else {}), repeat, warmup=warmup)


def ratio_text(times: dict[str, list[float]]) -> str:
    ratios = sorted(p / o for o, p in zip(times["ours"], times["peer"], strict=True))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def report(row: str, peer: str, times: dict[str, list[float]], unit: str, extra: str = "") -> None:
    ours, theirs = statistics.median(times["ours"]), statistics.median(times["peer"])
    line = f"| {row} | {peer} | {ours * 1e3:.0f} | {theirs * 1e3:.0f} | {ratio_text(times)} | {extra} |"
    ROWS.append(line)
    print(line, flush=True)


class Peers:
    """The peers, each in a process of its own (``EngineProcess``), and how to run them.

    One process per engine, apart from gpt2lab's: once CTranslate2 has generated in a process, gpt2lab's
    decoding in that same process runs markedly slower (each library brings its own OpenMP runtime);
    with CTranslate2 in another process it does not (docs/benchmarks.md)."""

    def __init__(self, directory: Path, threads: int, llama_convert: Path | None) -> None:
        self.ct2 = EngineProcess("ctranslate2", directory, threads)
        self.llama_note = llama_available(llama_convert)
        self.llama = None if self.llama_note else EngineProcess("llama.cpp", directory, threads, llama_convert)
        self.llama_quants = () if self.llama is None else LlamaServer.QUANTS

    def ct2_greedy(self, quant: str, prompts: list[list[int]], n: int) -> list[list[int]]:
        return self.ct2.call("greedy", quant, prompts, n)

    def llama_greedy(self, quant: str, prompt: list[int], n: int) -> list[int]:
        return self.llama.call("greedy", quant, prompt, n)

    def close(self) -> None:
        for engine in (self.ct2, self.llama):
            if engine is not None:
                engine.close()


class EngineProcess:
    """A peer engine loaded in a child process (``serve``); ``call`` runs one of its methods there and
    returns the (small) answer, so a timed call costs the pipe's round trip on top of the engine's work."""

    def __init__(self, engine: str, directory: Path, threads: int, llama_convert: Path | None = None) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        # a daemon: a run that fails in a row must not wait at exit for a child blocked on the pipe
        self.process = context.Process(
            target=serve, args=(child, engine, directory, threads, llama_convert), daemon=True
        )
        self.process.start()
        child.close()
        self.call("ready")

    def call(self, method: str, *args):
        self.conn.send((method, args))
        ok, answer = self.conn.recv()
        if not ok:
            raise RuntimeError(f"peer engine failed: {answer}")
        return answer

    def close(self) -> None:
        self.conn.send(("stop", ()))
        self.process.join(timeout=30)


def serve(conn, engine: str, directory: Path, threads: int, llama_convert: Path | None) -> None:
    """The child process's loop: convert and load ``engine``'s models, then answer calls until "stop"."""
    torch.set_num_threads(threads)  # gpt2lab is not run here; torch only converts
    try:
        server = (
            Ct2Server(directory, threads) if engine == "ctranslate2" else LlamaServer(directory, threads, llama_convert)
        )
    except Exception as e:  # answers the parent's "ready" call, which raises it with the message
        conn.recv()
        conn.send((False, f"{engine} could not be loaded: {type(e).__name__}: {e}"))
        return
    while True:
        method, args = conn.recv()
        if method == "stop":
            return
        try:
            conn.send((True, None if method == "ready" else getattr(server, method)(*args)))
        except Exception as e:  # the parent raises it with the message
            conn.send((False, f"{type(e).__name__}: {e}"))


class Ct2Server:
    """CTranslate2's float32 and int8 models, converted by its own converter from ``directory``."""

    def __init__(self, directory: Path, threads: int) -> None:
        import ctranslate2

        vocab = json.loads((directory / "vocab.json").read_text())
        self.token_of = {i: t for t, i in vocab.items()}
        self.models = {}
        for quant in ("float32", "int8"):
            out = directory.parent / f"ct2-{quant}"
            ctranslate2.converters.TransformersConverter(str(directory)).convert(str(out), quantization=quant)
            self.models[quant] = ctranslate2.Generator(
                str(out), device="cpu", compute_type=quant, intra_threads=threads, inter_threads=1
            )

    def greedy(self, quant: str, prompts: list[list[int]], n: int) -> list[list[int]]:
        tokens = [[self.token_of[i] for i in p] for p in prompts]
        results = self.models[quant].generate_batch(
            tokens, max_length=n, sampling_topk=1, end_token=[], include_prompt_in_result=False
        )
        return [r.sequences_ids[0] for r in results]

    def forward(self, quant: str, rows: list[list[int]], whole: bool = False):
        """Logits of every position; only their argmax unless ``whole`` (the timed rows send little back)."""
        logits = np.asarray(self.models[quant].forward_batch(rows))
        return logits if whole else logits.argmax(-1)


class LlamaServer:
    """llama.cpp's f32 and q8_0 models, converted by its own ``convert_hf_to_gguf.py`` from ``directory``."""

    QUANTS = ("f32", "q8_0")

    def __init__(self, directory: Path, threads: int, convert: Path) -> None:
        self.threads, self.models, self.paths = threads, {}, {}
        for quant in self.QUANTS:
            gguf = directory.parent / f"gpt2-{quant}.gguf"
            cmd = [sys.executable, str(convert), str(directory), "--outtype", quant, "--outfile", str(gguf)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                said = "\n".join(done.stderr.strip().splitlines()[-5:])
                raise RuntimeError(
                    f"{convert} exited with status {done.returncode} converting to {quant}; its last words:\n{said}\n"
                    "--llama-convert takes convert_hf_to_gguf.py inside llama.cpp's source tree, which it imports "
                    "from (its conversion/ and gguf-py/ folders), run with a Python that has gguf installed"
                )
            self.models[quant], self.paths[quant] = load_llama(gguf, threads), gguf

    def greedy(self, quant: str, prompt: list[int], n: int) -> list[int]:
        import llama_cpp

        llm = self.models[quant]
        llm.reset()
        llm.eval(prompt)
        out = []
        for i in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            out.append(int(logits.argmax()))
            if i < n - 1:
                llm.eval([out[-1]])
        return out

    def scores(self, quant: str, rows: list[list[int]]):
        """The logits of every position of each row (a model loaded with every position's logits kept)."""
        llm = load_llama(self.paths[quant], self.threads, logits_all=True)
        out = []
        for row in rows:
            llm.reset()
            llm.eval(row)
            out.append(np.array(llm.scores[: len(row)]))
        return np.stack(out)


def llama_available(convert: Path | None) -> str:
    """Why llama.cpp's rows cannot run, or "" when they can."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (a long source build: pip install llama-cpp-python)"
    if convert is None or not convert.is_file():
        return "no --llama-convert: pass llama.cpp's convert_hf_to_gguf.py (in its source tree)"
    return ""


def load_llama(path: Path, threads: int, logits_all: bool = False):
    """A llama.cpp model on ``threads`` threads, weights in plain buffers: its repacked (AMX) q8_0 buffers
    crashed in decoding on an AMX Xeon, and llama-cpp-python has no argument for them, so its default
    model parameters are wrapped to switch them off."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    if not getattr(low.llama_model_default_params, "plain_buffers", False):
        default = low.llama_model_default_params

        def plain():
            params = default()
            params.use_extra_bufts = False
            return params

        plain.plain_buffers = True
        low.llama_model_default_params = plain
    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=CONTEXT,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=logits_all,
        verbose=False,
    )


BYTES_PER_WEIGHT = {
    "float32": 4.0,
    "f32": 4.0,
    "int8": 1.0,
    "q8_0": 34 / 32,
}  # q8_0: 32 int8 and one fp16 scale a block


DECODE_CASES = [("float32", 1, 128), ("float32", 1, 512), ("float32", 8, 128), ("int8", 1, 128), ("int8", 8, 128)]


def decode_cases(text: str) -> list[tuple[str, int, int]]:
    """An argparse type: greedy rows as WEIGHTS:BATCH:NEW_TOKENS, comma-separated (float32:1:128)."""
    cases = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        weights, _, rest = item.partition(":")
        batch, _, new = rest.partition(":")
        numbers = batch.isdigit() and new.isdigit()
        if weights not in ("float32", "int8") or not numbers or min(int(batch), int(new)) < 1:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not WEIGHTS:BATCH:NEW_TOKENS (float32 or int8, then two positive integers)"
            )
        if int(new) > CONTEXT - PROMPT:
            raise argparse.ArgumentTypeError(
                f"{item!r}: at most {CONTEXT - PROMPT} new tokens after the {PROMPT}-token prompt"
            )
        cases.append((weights, int(batch), int(new)))
    if not cases:
        raise argparse.ArgumentTypeError("name at least one row, e.g. float32:1:128")
    return cases


def decode_rows(model: GPT, int8: GPT, peers: Peers, repeat: int, cases=DECODE_CASES, compiled: bool = False) -> None:
    """Greedy generation of N new tokens after a 16-token prompt: gpt2lab against each peer; with
    ``compiled``, every row runs again with gpt2lab's compiled decode step (compiled
    before timing; the compile time is printed)."""
    probe = read_probe(2**30)  # 1 GiB, read in the same alternation as each row
    if compiled:  # inductor lays out every step compiled after a laid-out one in the process: plain ones first
        cases = sorted(cases, key=lambda c: prepacks_weights(model if c[0] == "float32" else int8, c[1]))
    for quant, batch, n in cases:
        for compile in (False, True) if compiled else (False,):
            decode_row(model, model if quant == "float32" else int8, quant, batch, n, compile, peers, repeat, probe)


def decode_row(model, ours_model, quant, batch, n, compile, peers, repeat, probe) -> None:
    """One greedy row: ``ours_model`` (``model`` or its int8 copy) against each peer."""
    prompts = torch.randint(0, 50257, (batch, PROMPT), generator=torch.Generator().manual_seed(batch)).tolist()
    row = f"greedy b={batch} {'fp32' if quant == 'float32' else '8-bit'}, {n} new tokens"
    if compile:
        row += ", gpt2lab compiled"
    ours = lambda: generate(ours_model, prompts, n, temperature=0, eos_id=None, compile=compile)
    engines = {f"CTranslate2 {quant}": (lambda: peers.ct2_greedy(quant, prompts, n), quant)}
    llama_quant = "f32" if quant == "float32" else "q8_0"
    if batch == 1 and llama_quant in peers.llama_quants:
        engines[f"llama.cpp {llama_quant}"] = (lambda: [peers.llama_greedy(llama_quant, prompts[0], n)], llama_quant)
    start = time.perf_counter()
    same = ours()
    if compile:
        kept = faster_step(ours_model, batch)
        print(f"({row}: compiled and ran once in {time.perf_counter() - start:.0f} s; {kept} step kept)", flush=True)
    for peer, (fn, peer_quant) in engines.items():
        agree = np.mean(np.array(same) == np.array(fn()))
        times = paired(ours, fn, repeat, probe=probe)
        bandwidth = 2**30 / statistics.median(times["probe"])
        steps = n / statistics.median(times["ours"]), n / statistics.median(times["peer"])
        ours_bw = decode_bytes(model, BYTES_PER_WEIGHT[quant]) * steps[0] / bandwidth
        peer_bw = decode_bytes(model, BYTES_PER_WEIGHT[peer_quant]) * steps[1] / bandwidth
        extra = (
            f"{batch * steps[0]:.1f} vs {batch * steps[1]:.1f} tok/s; of mem. bandwidth ({bandwidth / 1e9:.1f} GB/s): "
            f"{ours_bw:.0%} vs {peer_bw:.0%}; same tokens {agree:.0%}"
        )
        report(row, peer, times, "ms", extra)


def prefill_rows(model: GPT, int8: GPT, peers: Peers, repeat: int) -> None:
    """A 256-token prompt to its first new token (batch 1 and 8), float32 and 8-bit; llama.cpp runs the 8
    one after another."""
    for quant, ours_model in (("float32", model), ("int8", int8)):
        llama_quant = "f32" if quant == "float32" else "q8_0"
        for batch in (1, 8):
            prompts = torch.randint(0, 50257, (batch, 256), generator=torch.Generator().manual_seed(256 + batch))
            prompts = prompts.tolist()
            ours = lambda p=prompts, m=ours_model: generate(m, p, 1, temperature=0, eos_id=None)
            engines = {f"CTranslate2 {quant}": lambda p=prompts, q=quant: peers.ct2_greedy(q, p, 1)}
            if llama_quant in peers.llama_quants:
                engines[f"llama.cpp {llama_quant}"] = lambda p=prompts, q=llama_quant: [
                    peers.llama_greedy(q, one, 1) for one in p
                ]
            row = f"prefill {batch}x256{'' if quant == 'float32' else ' 8-bit'}, to the first token"
            for peer, fn in engines.items():
                note = "one prompt after another" if batch > 1 and peer.startswith("llama") else ""
                times = paired(ours, fn, repeat, warmup=REPEATED_WARMUP)
                report(row, peer, times, "ms", note)


def forward_rows(model: GPT, peers: Peers, repeat: int) -> None:
    """Logits of every position of 1 or 8 sequences of 256 tokens (CTranslate2's forward_batch)."""
    for batch in (1, 8):
        idx = torch.randint(0, 50257, (batch, 256), generator=torch.Generator().manual_seed(512 + batch))
        rows = idx.tolist()

        def ours(idx=idx):
            with torch.no_grad():
                return model(idx)[0]

        peer = lambda rows=rows: peers.ct2.call("forward", "float32", rows)
        times = paired(ours, peer, repeat, warmup=REPEATED_WARMUP)
        report(f"forward {batch}x256, all logits", "CTranslate2 float32", times, "ms")


def quality_rows(model: GPT, int8: GPT, peers: Peers) -> None:
    """Each 8-bit engine's logits against gpt2lab's float32 ones, 8 x 256 random tokens: top-1 agreement,
    mean and max absolute error over the logits' standard deviation (2,048 positions: fewer left the
    top-1 agreement within its own noise; docs/benchmarks.md)."""
    idx = torch.randint(0, 50257, (8, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(idx)[0].numpy()
        got = {"gpt2lab int8": int8(idx)[0].numpy()}
    got["CTranslate2 int8"] = peers.ct2.call("forward", "int8", idx.tolist(), True)
    if "q8_0" in peers.llama_quants:
        got["llama.cpp q8_0"] = peers.llama.call("scores", "q8_0", idx.tolist())
    std = ref.std()
    for engine, logits in got.items():
        err = np.abs(logits - ref)
        top1 = (logits.argmax(-1) == ref.argmax(-1)).mean()
        line = f"| 8-bit quality | {engine} | top-1 same as fp32 {top1:.1%} | mean err {err.mean() / std:.3f} std | max err {err.max() / std:.3f} std |"
        ROWS.append(line)
        print(line, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    rows = ("decode", "prefill", "forward", "quality")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--repeat", type=positive_int, default=5, help="timed pairs per row")
    ap.add_argument("--only", type=names_of(rows), default=set(rows), help=f"rows to run, from {','.join(rows)}")
    ap.add_argument("--llama-convert", type=Path, help="llama.cpp's convert_hf_to_gguf.py (llama.cpp rows)")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also run every greedy row with gpt2lab's compiled step",
    )
    ap.add_argument(
        "--decode",
        type=decode_cases,
        default=DECODE_CASES,
        help="the greedy rows of --only decode, as WEIGHTS:BATCH:NEW_TOKENS (default: "
        + ",".join(f"{w}:{b}:{n}" for w, b, n in DECODE_CASES)
        + ")",
    )
    ap.add_argument("--quick", action="store_true", help="greedy b=1 fp32 and 8-bit, 32 tokens, and 8-bit quality")
    ap.add_argument("--preset", default="gpt2", help="the model's size (a gpt2lab preset); gpt2 = 124M")
    args = ap.parse_args()
    if args.preset not in PRESETS:
        ap.error(f"--preset must be one of {', '.join(PRESETS)}, got {args.preset!r}")
    torch.set_num_threads(args.threads)
    only = args.only
    import ctranslate2

    versions = f"ctranslate2 {ctranslate2.__version__}"
    if importlib.util.find_spec("llama_cpp"):
        import llama_cpp

        versions += f", llama-cpp-python {llama_cpp.__version__}"
    print(cpu_header(args.threads) + " (every engine)", flush=True)
    print(f"{versions}; memory read now {memory_read_gbs(2**30):.1f} GB/s\n", flush=True)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_name(args.preset, block_size=CONTEXT)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "gpt2-random"
        save_pretrained(model, directory)
        try:
            peers = Peers(directory, args.threads, args.llama_convert)
        except RuntimeError as e:  # a peer that could not convert or load: its message, not a traceback
            sys.exit(f"bench/peers.py: {e}")
        if peers.llama_note:
            print(f"llama.cpp rows skipped: {peers.llama_note}\n", flush=True)
        int8 = quantize_int8(model)
        print("| row | peer | gpt2lab ms | peer ms | peer time / gpt2lab time | |\n|---|---|---:|---:|---:|---|")
        if args.quick:
            decode_rows(model, int8, peers, args.repeat, [("float32", 1, 32), ("int8", 1, 32)], args.compile)
            only = {"quality"}
        if "decode" in only:
            decode_rows(model, int8, peers, args.repeat, args.decode, args.compile)
        if "prefill" in only:
            prefill_rows(model, int8, peers, args.repeat)
        if "forward" in only:
            forward_rows(model, peers, args.repeat)
        if "quality" in only:
            quality_rows(model, int8, peers)
        peers.close()
    print("\nKernels Backends(linear='auto') chose here (gpt2lab.kernels):")
    for name, entry in sorted(model.lm_head.table._entries().items()):
        print(f"  {name}: {entry['kernel']}  (us per product: {entry['us_per_product']})")


if __name__ == "__main__":
    main()
