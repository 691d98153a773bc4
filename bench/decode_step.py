"""Where the time of one eager decode step goes (random GPT-2 124M weights, CPU; batch 1 unless
``--batch`` says otherwise).

    python bench/decode_step.py [--rounds 20] [--threads 2] [--int8] [--new-tokens 1000] [--batch 1]

Five things are timed in one process, in alternation, ``--rounds`` times each:

- the step: ``gpt2lab.decode.decode_one_token`` at position 64 of a 64-token prompt, as generation
  runs it: where every block's products run gpt2lab's own kernels (``Block.plan``), all the blocks in
  one op (``GPT._blocks_in_one_op``), and where ``ln_f`` and the lm_head run gpt2lab's kernels too, the
  whole step from the tokens' embeddings to the logits in one op (``GPT._logits_in_one_op``); then
  also what it spends outside those ops (a timer around the blocks' op and the lm_head's call, or
  around the one op): the Python and the torch calls between them;
- the same step with each block its own op, called from Python block by block;
- the same step block by block in Python (the blocks' one-op steps turned off; the same kernels);
  each of these three is timed right after an untimed step of its own kind, as in a generation, and
  they take turns going first;
- its products inside it: a timer around every linear layer's call during that Python step (with
  the GELU where the MLP's first product takes it);
- the same products back to back: each layer called on a ready input, in the step's order;
- the step without products: every linear layer returns a ready-made output of its shape, so only
  the rest of the Python step runs (layer norms, attention, residual adds, the Python between them).

The layers read their weights as generation would for a call of ``--new-tokens`` tokens
(``GPT.pack_for_decoding``: the copies it makes, and numpy's BLAS where it runs the products there,
with its threads set as generation sets them; 0: neither), each product's kernel chosen once
(``GPT.plan_decoding``). The memory read rate (``common.read_probe`` over as many bytes
as the step's weights) is timed in the same alternation. The step minus its products is what the
rest costs inside a real step; against the step without products, it shows how much slower the same
small operations run right after a product has streamed megabytes of weights through the caches.
"""

from __future__ import annotations

import os

from gpt2lab.cli import openmp_wait_policy

openmp_wait_policy(os.environ)  # as the command line does, before torch loads its OpenMP runtime
import argparse  # noqa: E402
import contextlib  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from common import cpu_header, positive_int, read_probe  # noqa: E402

from gpt2lab import GPT, GPTConfig, native  # noqa: E402
from gpt2lab.decode import decode_one_token, prefill  # noqa: E402
from gpt2lab.kernels import COPY_KERNELS, alternated  # noqa: E402
from gpt2lab.ops import Linear, numpy_blas_threads  # noqa: E402
from gpt2lab.quantize import Int8Linear, quantize_int8  # noqa: E402

PROMPT = 64


def linear_layers(model: GPT) -> list[torch.nn.Module]:
    """The step's linear layers in the order it calls them."""
    layers = []
    for block in model.h:
        layers += [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    return layers + [model.lm_head]


def weight_bytes(layer: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values())


class Timers:
    """Replaces the calls of each layer (``forward`` and, on an ``ops.Linear``, ``gelu``, which calls
    ``forward`` when it does not fuse) with a timed or stubbed version, per instance."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        self.spent, self.depth, self.stub = 0.0, 0, False
        self.outputs: dict[tuple, torch.Tensor] = {}
        for layer in layers:
            for name in ("forward", "gelu"):
                if hasattr(layer, name):
                    setattr(layer, name, self._wrap(layer, getattr(layer, name)))

    def _wrap(self, layer, fn):
        timed = self._timed(fn)

        def call(x):
            if self.stub:
                key = (*x.shape[:-1], layer.out_features)
                if key not in self.outputs:
                    self.outputs[key] = torch.zeros(key)
                return self.outputs[key]
            if self.depth:  # gelu calling forward: timed once, by the outer call
                return fn(x)
            self.depth += 1
            try:
                return timed(x)
            finally:
                self.depth -= 1

        return call

    def _timed(self, fn):
        """fn, its time added to ``spent`` at each call."""

        def call(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.spent += time.perf_counter() - start

        return call

    def time_op(self, name: str) -> None:
        """Time each call of the op ``torch.ops.gpt2lab_native.<name>`` too (as the model looks it up at
        each call)."""
        ops = torch.ops.gpt2lab_native
        setattr(ops, name, self._timed(getattr(ops, name)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=positive_int, default=20)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--int8", action="store_true", help="int8 weights (gpt2lab.quantize)")
    ap.add_argument("--new-tokens", type=positive_int, default=1000, help="the generation whose weight copies to read")
    ap.add_argument("--batch", type=positive_int, default=1, help="rows decoded together")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_header(args.threads))
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()
    if args.int8:
        model = quantize_int8(model)
    layers = linear_layers(model)
    assert all(isinstance(m, (Linear, Int8Linear)) for m in layers)
    n_bytes = sum(weight_bytes(m) for m in layers)
    rows = args.batch
    inputs = [torch.randn(rows, 1, m.in_features) for m in layers]
    read = read_probe(n_bytes)
    timers = Timers(layers)
    if native.available():
        for op in ("decode_blocks", "decode_logits"):  # the blocks' one op, or that op on to the logits
            timers.time_op(op)
    token, pos = torch.full((rows, 1), 5), torch.tensor([PROMPT])
    in_step: list[float] = []  # the Python step's products
    in_ops: list[float] = []  # the step's time in the blocks' one op and the lm_head

    copies = model.pack_for_decoding(rows, args.new_tokens - 1) if args.new_tokens else []
    model.plan_decoding(rows)  # each layer's kernel chosen once, as generation does
    one_op = [block.step_plan for block in model.h]
    in_numpy = any(m.reads_numpy for m in copies)
    threads = numpy_blas_threads if in_numpy else contextlib.nullcontext

    stepped: dict[str, list[float]] = {"step": [], "block ops": [], "python step": []}

    ways = {"step": contextlib.nullcontext, "block ops": model.block_ops, "python step": model.python_blocks}

    def timed_step(kind: str) -> None:
        """One step untimed, then the one timed: each kind's timed step follows a step of its own kind,
        not whatever the alternation ran before it (a step that follows the products back to back
        starts colder)."""
        with threads(), ways[kind]():
            decode_one_token(model, token, pos)
            timers.spent = 0.0
            start = time.perf_counter()
            decode_one_token(model, token, pos)
            stepped[kind].append(time.perf_counter() - start)
        if kind == "python step":
            in_step.append(timers.spent)
        if kind == "step":
            in_ops.append(timers.spent)

    def all_steps() -> None:
        """The kinds of step one after the other, each in turn first (so none always follows another)."""
        kinds = list(stepped)
        turn = len(stepped["step"]) % len(kinds)
        for kind in kinds[turn:] + kinds[:turn]:
            timed_step(kind)

    def stubbed() -> None:
        timers.stub = True
        with threads(), model.python_blocks():
            decode_one_token(model, token, pos)
        timers.stub = False

    def alone() -> None:
        with threads():
            for layer, x in zip(layers, inputs, strict=True):
                layer(x)

    with torch.no_grad():
        model.setup_cache(rows, PROMPT + 1)
        prefill(model, torch.randint(0, model.config.vocab_size, (rows, PROMPT)), torch.arange(PROMPT))
        # The read first, then a pause: for about 10 ms after torch's threads worked (the two-thread
        # read), OpenMP's spinning slowed products in numpy's BLAS by a third, which decoding never meets.
        settle = functools.partial(time.sleep, 0.03)
        fns = {
            "read": read,
            "pause": settle,
            "step without products": stubbed,
            "products back to back": alone,
            "steps": all_steps,
        }
        times = alternated(fns, args.rounds, warmup=2)
    in_step, in_ops = in_step[2:], in_ops[2:]  # the warm-up calls
    times |= {kind: values[2:] for kind, values in stepped.items()}
    rest = [s - p for s, p in zip(times["python step"], in_step, strict=True)]
    planned = sum(p is not None for p in one_op)
    table = {f"step ({planned} of {len(one_op)} blocks planned as one op)": times["step"]}
    if planned == len(one_op):
        table["  outside its ops (the blocks' and the lm_head's, or one from the tokens to the logits)"] = [
            s - o for s, o in zip(times["step"], in_ops, strict=True)
        ]
    table |= {
        "step, each block its own op": times["block ops"],
        "step, block by block in Python": times["python step"],
        "  its products, inside it": in_step,
        "  the rest of it": rest,
        "products back to back": times["products back to back"],
        "step without products": times["step without products"],
        f"read {n_bytes / 1e6:.0f} MB (memory ceiling)": times["read"],
    }
    kind = "int8" if args.int8 else "fp32"
    laid = sum(m.packed[3] in COPY_KERNELS for m in copies)  # copies made
    where = ", in numpy's BLAS" if in_numpy else ""
    print(
        f"{kind} weights, batch {rows}, {len(layers)} products ({laid} from copies{where}), "
        f"{args.rounds} rounds in alternation"
    )
    print("| measure | median ms | range (ms) |\n|---|---:|---|")
    for name, values in table.items():
        ms = [1000 * v for v in values]
        print(f"| {name} | {statistics.median(ms):.2f} | {min(ms):.2f}-{max(ms):.2f} |")
    for other, name in (("block ops", "the step of block ops"), ("python step", "the Python step")):
        ratios = sorted(a / b for a, b in zip(times["step"], times[other], strict=True))
        quartiles = statistics.quantiles(ratios, n=4)
        print(
            f"step / {name}, round by round: median {statistics.median(ratios):.3f}x, "
            f"quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}"
        )


if __name__ == "__main__":
    main()
