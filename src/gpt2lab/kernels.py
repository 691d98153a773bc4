"""Which CPU kernel runs each linear product: measured on the machine at hand, remembered per CPU.

The fastest kernel for a product depends on the CPU, on the product's shape and on how many
rows (tokens) it has: oneDNN's inner product and MKL's sgemm (``F.linear``) trade places between an
AVX2-only AMD EPYC and an AVX-512/AMX Intel Xeon, and between one row (decoding, bound by how fast the
weight streams from memory) and hundreds (prefill and training, bound by arithmetic). So, like
cuDNN's benchmark mode, ``Backends(linear="auto")`` measures: the first time a layer meets a
(out, in, rows bucket) product, each candidate kernel is timed on a product of that shape, and the
fastest is remembered in a JSON file keyed by the CPU model, the torch version and the thread count
(``machine_key``).
Float32 products choose between oneDNN and MKL (``gpt2lab.ops.linear``), int8 ones
(``gpt2lab.quantize``) between fbgemm, ``torch._int_mm`` and oneDNN's quantized linear
(``gpt2lab.ops.int8_linear``); an MLP's first product outside training also measures oneDNN with its
GELU fused in (``gpt2lab.ops.linear_gelu``), and a GELU on its own its forms (``gpt2lab.ops.tanh_gelu_``,
kind ``tanh_gelu``); and a product without gradients measures a copy of the
weight laid out for its row count (MKL's packed layout at two rows or more, the transposed layout at
one) with the time of making the copy (kind ``packed``), from which a layer decides whether and when to
keep one (``gpt2lab.ops.Linear``); a one-row product without gradients also measures numpy's BLAS, on
the weight and on its transposed copy (kind ``numpy``), which a decode step takes for all of its
products or for none (``GPT.pack_for_decoding``). A decode step's attention is measured the same way, per
query heads, head size and keys bucket (kind ``attention``: ``Backends.decode_attention``), and so is a
prompt's causal attention, per query heads, head size and length bucket (kind ``causal``:
``Backends.causal_attention``), and what an
int8 block's decode step saves as one op (kind ``int8_block``, a second or two once per width, heads
and rows: ``model.Block.plan``). Later runs on that machine measure nothing. Measuring
one product takes a fraction of a second: weights totalling ``STREAM_BYTES`` when the rows are few (so
they stream from memory, as in a decode step; at most ``MAX_COPIES`` copies of a small weight, whose
cost is the kernel's fixed cost per call; a wide weight whole, since how a kernel splits it between
threads sets its read rate: MKL reads the lm_head of 124M at 8 rows at half oneDNN's rate, and an
8192-output slice of it faster than oneDNN; and before each timed call, untimed, a read of
``EVICT_FACTOR`` times as many bytes as the CPU's last-level cache holds, so that no kernel finds the
weights it read in its last call still cached: a decode step's weights, read once per step, outgrow
that cache, while a Xeon's 480 MiB L3 held most of a kernel's 64 MiB between its calls and flattered
some kernels far more than others), and at most ``MAX_OUT`` of a wide product's outputs when the rows
are many (per output it then behaves as the whole). Small products are measured too: a call's fixed
cost differs between the kernels by several times (oneDNN's is the larger on some CPUs), and a small
model's decode step is made of such calls.

Overrides, most specific first: an explicit ``Backends(linear="onednn" | "torch")``; the environment
variable ``GPT2LAB_LINEAR_KERNEL`` (``onednn``, ``torch`` or ``auto``) for models built with ``auto``;
an edited ``"kernel"`` entry in the file. ``GPT2LAB_KERNEL_CACHE`` names the file (default
``$XDG_CACHE_HOME/gpt2lab/linear-kernels.json``, else ``~/.cache/...``). A machine where the file
cannot be written still works: the choices are kept in memory for the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from gpt2lab import files, native, ops
from gpt2lab.device import available_memory
from gpt2lab.errors import ConfigError

ENV_KERNEL = "GPT2LAB_LINEAR_KERNEL"
ENV_CACHE = "GPT2LAB_KERNEL_CACHE"
FLOAT32_KERNELS = ("onednn", "torch")
# kernels that read a copy of the weight (ops.copy_weight)
COPY_KERNELS = ("mkl_packed", "onednn_packed", "onednn_t", "torch_t", "numpy_t", "avx2_f32", "avx2_f32_blocks")
# copy kernels whose copy differs from the others' of their kind (``avx2_f32`` reads the weight itself: its
# "copy" costs nothing; ``avx2_f32_blocks`` and ``onednn_packed`` read layouts of their own): the time of
# making it is its own, ``pack <kernel>``; the others share ``pack``, the time of making the first
# candidate's copy
OWN_COPIES = ("avx2_f32", "avx2_f32_blocks", "onednn_packed")
NUMPY_KERNELS = ops.NUMPY_KERNELS  # one-row products in numpy's BLAS (ops.numpy_linear)
# what is measured (``candidates``); a file's entries of other kinds are dropped
KINDS = ("float32", "int8", "packed", "steps", "gelu", "numpy", "tanh_gelu", "attention", "int8_block", "causal")
# a kind's revision, where one of its kernels changed how it runs or how it is timed: entries timed at an older
# one are timed again
REVISIONS = {"int8": 4, "gelu": 2, "packed": 2, "steps": 2, "numpy": 2}
# gpt2lab.native's: an entry timing them records their build (source_digest)
NATIVE_KERNELS = ("avx2", "avx2_f32", "avx2_f32_blocks", "one_op", "avx512")
MAX_BUCKET = 256  # rows: 1, 2, 4, ... 256; more rows behave as 256
# int8 products are measured up to 2,048 rows: past 256 their kernels' cost per row still parts
# (docs/benchmarks.md, item 7); a kernel that took more than PRUNE times the fastest's time at half
# the rows is not timed at more (torch._int_mm, many times fbgemm's time without VNNI, would take
# seconds a call there). So are the copies of kind packed: what oneDNN's own layout saves grows with
# the rows (item 20)
MAX_INT8_BUCKET = 2048
LARGE_BUCKETS = ("int8", "packed")  # the kinds measured up to MAX_INT8_BUCKET rows
MAX_KEYS_BUCKET = 4096  # kinds attention and causal: keys 1, 2, 4, ... 4096; more keys behave as 4096
PRUNE = 2.0
MAX_OUT = 8192
STREAM_BYTES = 64 * 2**20
MAX_COPIES = 128
FEW_ROWS = 16  # up to this many rows a product is bound by reading its weight
EVICT_FACTOR = 1.5  # bytes read between timed few-row products, per byte of the last-level cache
CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")  # Linux's description of the CPU's caches
MARGIN = 0.03  # a later candidate must be this much faster than the choice so far to be chosen


def candidates(kind: str, rows: int) -> tuple[str, ...]:
    """The kernels that may run a ``kind`` product of ``rows`` rows, the fallback first; each later one
    is chosen only if ``MARGIN`` faster than the choice among those before it. Kinds: "float32",
    "int8", "packed" (whether a product of ``rows`` rows without gradients reads the weight from a copy
    laid out for it, against the float32 kernels: at two rows or more MKL's packed layout,
    ``mkl_packed``, and oneDNN's own, ``onednn_packed``; at one row, where that did not pay, the
    transposed one, (in, out)-contiguous, read
    by oneDNN or MKL: ``onednn_t``, ``torch_t``, and on AVX2 CPUs gpt2lab's own kernel on the weight
    as it is, ``avx2_f32``, and on its copy in blocks of 16 output channels, ``avx2_f32_blocks``:
    ``gpt2lab.native``), "steps" (the "packed" kind of a decode step of two rows or more: its kernels
    and, up to ``FEW_ROWS`` rows, gpt2lab's two; apart from "packed", which repeated prefill products
    of that many rows weigh, ``ops.Linear.pack_repeated``), "gelu" (an MLP's first product and its tanh-GELU
    without gradients: one oneDNN call with the activation fused in, ``onednn_gelu``, against either
    float32 kernel then the GELU in the form its own kind chose), "numpy" (a one-row product without
    gradients in numpy's BLAS, on the weight as it is or on its transposed copy: ``numpy``, ``numpy_t``;
    none where numpy's BLAS cannot be told its threads. A decode step weighs these against the "packed"
    kind's kernels: ``GPT.pack_for_decoding``), "tanh_gelu" (not a product: the form of the tanh-GELU
    over a (rows, out) output without gradients, ``gpt2lab.ops.tanh_gelu_``'s ``tanh``, ``sigmoid`` or,
    where ``gpt2lab.native`` runs, ``avx2``),
    "attention" (not a product: a decode step's one query per head over ``rows`` keys of its KV cache,
    out = the query heads of every row, in = the head size: ``gpt2lab.ops.one_query_attention``'s
    ``products``, ``sdpa`` or, where ``gpt2lab.native`` runs, ``avx2``), "int8_block" (not a product:
    the decode step of an int8 block whose products all run gpt2lab's own kernel, out = its width, in =
    its heads, in Python, ``python``, or as one op, ``one_op`` (the model's blocks all in one:
    ``model.GPT._blocks_in_one_op``), where ``gpt2lab.native`` runs:
    ``model.Block.plan``, which weighs the difference against the products' own times), "causal" (not a
    product: a whole prompt's causal attention without gradients, ``rows`` queries and keys, out = the
    query heads of every row, in = the head size: ``gpt2lab.ops.causal_attention``'s ``sdpa`` or, where
    ``gpt2lab.native`` runs on an AVX-512 CPU, ``avx512``)."""
    if kind == "tanh_gelu":
        return tuple(f for f in ops.GELU_FORMS if f != "avx2" or native.available())
    if kind == "int8_block":
        return ("python", "one_op") if native.available() else ("python",)
    if kind == "attention":
        return tuple(k for k in ops.ONE_QUERY_KERNELS if k != "avx2" or native.available())
    if kind == "causal":
        return tuple(k for k in ops.CAUSAL_KERNELS if k != "avx512" or native.avx512())
    if kind == "numpy":
        return NUMPY_KERNELS if rows == 1 and ops.numpy_blas_available() else ()
    if kind == "int8":
        return ops.int8_kernels(rows)
    float32 = FLOAT32_KERNELS if ops.onednn_available() else ("torch",)
    if kind == "gelu":
        return float32 + ("onednn_gelu",) if ops.onednn_available() else float32
    own = ("avx2_f32", "avx2_f32_blocks") if rows <= FEW_ROWS and native.available() else ()
    if kind == "packed" and rows == 1:
        return float32 + tuple(f"{k}_t" for k in float32) + own
    packed = float32 + ("mkl_packed",) if ops.packing_available() else float32
    onednn_packed = ("onednn_packed",) if ops.onednn_packing_available() else ()
    if kind == "packed":
        return packed + onednn_packed
    if kind == "steps":  # gpt2lab's kernels before oneDNN's layout: a block of them steps in one op
        return packed + own + onednn_packed
    return float32


def decode_kind(rows: int) -> str:
    """The kind whose kernels and copies a decode step of ``rows`` rows weighs (``candidates``):
    ``packed`` at one row, ``steps`` at more (apart from the repeated prefill products' ``packed``)."""
    return "packed" if rows == 1 else "steps"


def fallback(kind: str = "float32", rows: int = 1) -> str:
    return candidates(kind, rows)[0]


def rows_bucket(rows: int, kind: str = "float32") -> int:
    """The power of two at or above ``rows``, at most MAX_BUCKET (MAX_INT8_BUCKET for kinds ``int8`` and ``packed``,
    MAX_KEYS_BUCKET for ``attention`` and ``causal``, whose rows are keys): products are measured per bucket."""
    cap = MAX_INT8_BUCKET if kind in LARGE_BUCKETS else MAX_BUCKET
    cap = MAX_KEYS_BUCKET if kind in ("attention", "causal") else cap
    return min(1 << max(rows - 1, 0).bit_length(), cap)


@functools.cache  # read once: the model, family and flags come from it, each time a key is made
def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def _cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in /proc/cpuinfo (Linux), else None."""
    for line in _cpuinfo_text().splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == field:
            return value.strip()
    return None


def cpu_model() -> str:
    """The CPU's model name, its family and model numbers where Linux gives them, and the widest vector
    instructions torch uses on it. A virtual machine may show one name for several generations (two
    AMD EPYCs of this project's, families 25 and 26, both say "AMD EPYC"); the numbers tell them apart."""
    name = _cpuinfo("model name") or platform.processor() or platform.machine()
    family, model = _cpuinfo("cpu family"), _cpuinfo("model")
    numbers = f"family {family} model {model}, " if family and model else ""
    return f"{name} ({numbers}{torch.backends.cpu.get_cpu_capability()})"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    return set((_cpuinfo("flags") or "").split())


@functools.cache
def has_amx_int8() -> bool:
    """Whether the CPU has AMX int8 tiles: a compiled CPU step then lays its int8 weights out for
    inductor's own kernels (``gpt2lab.decode.prepacks_weights``), which trace ``torch._int_mm``."""
    return "amx_int8" in cpu_flags()


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below the first with VNNI: its int8 kernels then saturate too
ONEDNN_ISAS_WITHOUT_VNNI = ("SSE41", "AVX", "AVX2", "AVX512_CORE")


def int8_weight_levels() -> int:
    """The largest magnitude an int8 weight may take here: 127, or 63 where an int8 kernel would
    multiply without VNNI. Without it every kernel multiplies unsigned 8-bit inputs (fbgemm's own and
    oneDNN's quantized linear's, or ``torch._int_mm``'s signed ones shifted by 128) by signed 8-bit
    weights into 16-bit pair sums that saturate past 32,767: 255 x 127 x 2 would. Weights within 63
    keep every pair sum exact (255 x 63 x 2 = 32,130). fbgemm has VNNI kernels for AVX-512 only, so an
    AVX2 CPU with AVX-VNNI gets 63 too, as does oneDNN capped below VNNI by ``ONEDNN_MAX_CPU_ISA``."""
    capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_ISAS_WITHOUT_VNNI
    return 127 if "avx512_vnni" in cpu_flags() and not capped else 63


# torch's own: ATEN_CPU_CAPABILITY; numpy's OpenBLAS: OPENBLAS_CORETYPE
LIBRARY_ISA_CAPS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")


def machine_key() -> str:
    """What a measurement is valid for: the CPU, the torch build, the thread count, how idle threads
    wait (a kernel call's fixed cost depends on it: ``gpt2lab.cli.openmp_wait_policy``) and any cap
    on the instructions MKL, oneDNN and OpenBLAS may use (the CPU model names torch's own, ``cpu_model``)."""
    wait = os.environ.get("OMP_WAIT_POLICY", "default").lower()
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads | wait {wait}"
    caps = [f"{name}={os.environ[name]}" for name in LIBRARY_ISA_CAPS if os.environ.get(name)]
    return " | ".join([key, *caps])


def default_path() -> Path:
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "gpt2lab" / "linear-kernels.json"


def resolve(setting: str) -> tuple[str, KernelTable | None]:
    """The kernel that linear layers built with ``setting`` (a ``Backends.linear``) run, and the table
    that chooses for them when that kernel is ``auto``. The environment overrides ``auto`` only."""
    if setting == "auto" and os.environ.get(ENV_KERNEL):
        setting = os.environ[ENV_KERNEL]
        if setting not in ops.LINEAR_KERNELS:
            raise ConfigError(f"{ENV_KERNEL} must be one of {', '.join(ops.LINEAR_KERNELS)}, got {setting!r}")
    return setting, (KernelTable() if setting == "auto" else None)


class KernelTable:
    """The kernel of each (out, in, rows bucket) product on this machine: read from ``path``, else
    measured once and written there (``path`` None: ``default_path()`` when first needed)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._chosen: dict[tuple, dict] = {}  # (out, in, rows bucket, kind, threads) -> its entry
        self._saved: dict[str, dict] = {}  # machine_key() -> the file's entries for it, read on first need

    def choose(self, out_features: int, in_features: int, rows: int, kind: str = "float32") -> str:
        """The kernel for a ``kind`` product of ``rows`` rows by an (out, in) weight; measured if not known."""
        return self._entry(out_features, in_features, rows, kind)["kernel"]

    def times(self, out_features: int, in_features: int, rows: int, kind: str) -> dict[str, float]:
        """Microseconds per product of each candidate kernel of a ``kind`` product, as measured (and
        ``pack``, where a candidate reads a copy); empty for an edited entry without them."""
        return _times(self._entry(out_features, in_features, rows, kind))

    def pack_repays(self, out_features: int, in_features: int, rows: int, kind: str = "packed") -> float:
        """After how many products of ``rows`` rows by an (out, in) weight the time that reading a copy
        laid out for them saves has repaid making the copy, as measured (kind ``packed``, or ``numpy``):
        the copy's time over the saving per product against the fastest of the kind's kernels that read
        the weight as it is (``avx2_f32`` among them: ``ops.READS_THE_WEIGHT``); infinite where no copy's
        kernel is the one chosen."""
        entry = self._entry(out_features, in_features, rows, kind)
        us, kernel = _times(entry), entry["kernel"]
        made = pack_key(kernel)
        in_place = (k for k in candidates(kind, rows) if k not in COPY_KERNELS or k in ops.READS_THE_WEIGHT)
        plain = min((us[k] for k in in_place if k in us and k != kernel), default=None)
        if kernel not in COPY_KERNELS or plain is None or not {made, kernel} <= us.keys():
            return math.inf  # not chosen, or an edited entry without the times this weighs
        if plain <= us[kernel]:
            return math.inf
        return us[made] / (plain - us[kernel])

    def in_place(
        self, out_features: int, in_features: int, rows: int, kind: str = "packed", slower: float = -MARGIN
    ) -> str | None:
        """The copy kernel of a ``kind`` product whose "copy" is the weight itself
        (``ops.READS_THE_WEIGHT``), where it measured at most ``slower`` (a fraction; negative: at least
        that much faster) slower than every kernel on the plain weight; else None."""
        us = self.times(out_features, in_features, rows, kind)
        plain = _fastest_plain(us, kind, rows)
        free = [k for k in candidates(kind, rows) if k in COPY_KERNELS and k in ops.READS_THE_WEIGHT and k in us]
        best = min(free, key=us.__getitem__, default=None)
        return best if best is not None and plain is not None and us[best] < (1 + slower) * plain else None

    def one_op_saving(self, n_embd: int, n_head: int, rows: int, steps: Callable) -> float:
        """The microseconds an int8 block of that width and head count saves per decode step of ``rows``
        rows as one op, as measured (kind ``int8_block``, on the steps ``steps`` makes: ``measure``;
        0 where it cannot run as one or an edited entry has no times)."""
        us = self._entry(n_embd, n_head, rows, "int8_block", steps).get("us_per_product")
        us = us if isinstance(us, dict) else {}
        return us["python"] - us["one_op"] if {"python", "one_op"} <= us.keys() else 0.0

    def _entry(self, out_features: int, in_features: int, rows: int, kind: str, steps: Callable | None = None) -> dict:
        key = (out_features, in_features, rows_bucket(rows, kind), kind, torch.get_num_threads())
        entry = self._chosen.get(key)
        if entry is None:
            entry = self._chosen[key] = self._lookup_or_measure(*key[:4], steps)
        return entry

    def _lookup_or_measure(
        self, out_features: int, in_features: int, rows: int, kind: str, steps: Callable | None = None
    ) -> dict:
        options = self._options(out_features, in_features, rows, kind)
        if len(options) == 1:
            return {"kernel": options[0]}
        name = f"{kind} {out_features}x{in_features} rows {rows}"
        entry = self._entries().get(name)
        if isinstance(entry, dict) and entry.get("kernel") in options and _complete(entry, options, rows, kind):
            return entry
        evicted = evicted_before(rows, kind)
        form = self.choose(out_features, in_features, rows, "tanh_gelu") if kind == "gelu" else "tanh"
        times = measure(
            out_features, in_features, rows, kind, evict_bytes=evicted, gelu_form=form, options=options, steps=steps
        )
        kernel = options[0]
        for other in options[1:]:
            if times[other] < (1 - MARGIN) * times[kernel]:
                kernel = other
        entry = {"kernel": kernel, "us_per_product": {k: round(v * 1e6, 1) for k, v in times.items()}}
        if streams(rows, kind):
            entry["evicted_mb"] = round(evicted / 2**20)
        if kind in REVISIONS:
            entry["revision"] = REVISIONS[kind]
        build = _native_build(options)
        if build is not None:
            entry["native"] = build
        self._record(name, entry)
        return entry

    def _options(self, out_features: int, in_features: int, rows: int, kind: str) -> tuple[str, ...]:
        """``candidates(kind, rows)``; for products of more rows than MAX_BUCKET (``LARGE_BUCKETS``), only those that
        took at most PRUNE times the fastest one's time at half as many rows (measured first; a kernel
        left out there is left out here)."""
        options = candidates(kind, rows)
        if kind not in LARGE_BUCKETS or rows <= MAX_BUCKET:
            return options
        us = self.times(out_features, in_features, rows // 2, kind)
        timed = [us[k] for k in options if _is_time(us.get(k))]
        if not timed:  # an edited entry without times
            return options
        return tuple(k for k in options if _is_time(us.get(k)) and us[k] <= PRUNE * min(timed))

    def file(self) -> Path:
        """The JSON file this table reads and writes."""
        if self.path is None:
            self.path = default_path()
        return self.path

    def _read_all(self) -> dict:
        try:
            data = json.loads(self.file().read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _entries(self) -> dict:
        key = machine_key()  # the thread count is part of it, and may change between calls
        if key not in self._saved:
            self._saved[key] = _current(self._read_all().get(key))
        return self._saved[key]

    def _record(self, name: str, entry: dict) -> None:
        """Keep ``entry`` and write it to the file, merged with what other processes wrote meanwhile
        (less this machine's entries of kinds no longer measured)."""
        self._entries()[name] = entry
        try:
            target = self.file().resolve()  # a link's target is written, the link kept
            if target.exists() and not target.is_file():  # /dev/null, a directory: never replaced
                return
            data = self._read_all()
            data[machine_key()] = _current(data.get(machine_key())) | {name: entry}
            target.parent.mkdir(parents=True, exist_ok=True)
            files.write_json(target, data)
        except (OSError, RuntimeError, files.DiskFullError):  # RuntimeError: a loop of links
            pass  # an unreadable, read-only or full cache: the choice lives in memory for this process


def _times(entry: dict) -> dict[str, float]:
    """An entry's microseconds per product of each candidate (``KernelTable.times``); empty for an edit
    without them."""
    us = entry.get("us_per_product")
    return us if isinstance(us, dict) else {}


def _current(entries) -> dict:
    """A machine's entries in the file of the kinds measured now (``KINDS``): those an older version
    measured for a kind it no longer has are left out."""
    if not isinstance(entries, dict):
        return {}
    return {name: entry for name, entry in entries.items() if name.split(" ", 1)[0] in KINDS}


@torch.no_grad()
def measure(
    out_features: int,
    in_features: int,
    rows: int,
    kind: str = "float32",
    repeat: int = 5,
    evict_bytes: int | None = None,
    gelu_form: str = "tanh",
    options: tuple[str, ...] | None = None,
    steps: Callable | None = None,
) -> dict[str, float]:
    """Seconds per product of each candidate kernel (``options``; None: ``candidates(kind, rows)``)
    on ``rows`` rows by an (out, in) ``kind`` weight, medians of runs taken in alternation (so a busy
    machine slows all alike); where a kernel that reads a copy of the weight is a candidate
    (``COPY_KERNELS``), also ``pack`` (and ``pack <kernel>`` for one whose copy is its own,
    ``pack_key``): the seconds of making the copy of the whole weight. ``evict_bytes`` are read,
    untimed, before each timed call (None: ``evicted_before(rows, kind)``). Kind ``gelu`` applies its
    GELU, where not fused, in ``gelu_form``; kind ``tanh_gelu`` times each form over a (rows, out)
    output. Kind ``int8_block`` times the functions ``steps(out, in, copies, rows, options)`` returns
    by option (``gpt2lab.quantize.block_steps``: a model's decode step each way)."""
    whole = rows <= FEW_ROWS or kind in ("attention", "int8_block", "causal")
    n = out_features if whole else min(out_features, MAX_OUT)
    element = 1 if kind == "int8" else 4
    per_weight = 2 * rows if kind == "attention" else 1  # a layer's keys and values, or a weight
    # an int8 block's four weights: (3 + 1 + 4 + 4) n x n bytes
    size = 12 * n * n if kind == "int8_block" else element * n * in_features * per_weight
    copies = min(MAX_COPIES, max(1, STREAM_BYTES // size)) if streams(rows, kind) else 1
    x = torch.full((rows, in_features), 0.5)
    options = candidates(kind, rows) if options is None else options
    if steps is not None:
        runs = steps(n, in_features, copies, rows, options)
    else:
        runs = {k: _runner(kind, k, n, in_features, copies, x, gelu_form) for k in options}
    scale = out_features / n / copies
    if evict_bytes is None:
        evict_bytes = evicted_before(rows, kind)
    evict = _evictor(evict_bytes)
    with ops.numpy_blas_threads() if kind == "numpy" else contextlib.nullcontext():  # as a decode step runs them
        timed = alternated(runs, repeat, before=evict)
    times = {k: statistics.median(v) * scale for k, v in timed.items()}
    copy_kernels: dict[str, str] = {}  # the time's key -> the kernel whose copy is made ("pack": the first's)
    for k in runs:
        if k in COPY_KERNELS:
            copy_kernels.setdefault(pack_key(k), k)
    if copy_kernels:  # and the time of making each form of copy of the whole weight
        times |= _copy_times(out_features, in_features, rows, copy_kernels, evict)
    return times


def _copy_times(out_features: int, in_features: int, rows: int, copy_kernels: dict[str, str], evict) -> dict:
    """Seconds of making the copy of an (out, in) weight that each kernel of ``copy_kernels`` (by the
    time's key, ``pack_key``) reads in products of ``rows`` rows, medians of three, as a model makes its
    copies: each into fresh memory (every copy is kept until all are timed, so none reuses the pages of
    one before it: touching new pages costs several times the copy itself on some machines, a virtual
    one's above all), from a weight read from memory (``evict`` runs before each). At most ``MAX_OUT``
    outputs are copied, standing for the whole weight (a copy's time is per byte)."""
    n = min(out_features, MAX_OUT)
    weight = torch.full((n, in_features), 0.01)
    kept: list[torch.Tensor] = []
    make = {key: lambda k=k: kept.append(ops.copy_weight(weight, rows, k)) for key, k in copy_kernels.items()}
    made = alternated(make, 3, warmup=0, before=lambda: (evict(), _release_freed_memory()))
    return {key: statistics.median(t) * out_features / n for key, t in made.items()}


@functools.cache
def _malloc_trim() -> Callable | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # no such function, or (Windows) no C library by that name
        return None


def _release_freed_memory() -> None:
    """Hand the memory the process has freed back to the OS (glibc's ``malloc_trim``; nothing elsewhere),
    so that the next allocation touches new pages, as a model's copies do, and not pages that an earlier
    measurement freed."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _fastest_plain(us: dict, kind: str, rows: int) -> float | None:
    """The fastest time in an entry's ``us`` of a ``kind`` kernel that reads the weight as it is (not a
    copy kernel), or None where it has none."""
    return min((us[k] for k in candidates(kind, rows) if k in us and k not in COPY_KERNELS), default=None)


def pack_key(kernel: str) -> str:
    """The time in a measurement of making the copy ``kernel`` reads (``OWN_COPIES``)."""
    return f"pack {kernel}" if kernel in OWN_COPIES else "pack"


def _complete(entry: dict, options: tuple[str, ...], rows: int, kind: str) -> bool:
    """Whether a remembered entry has every measurement its kind reads, taken as its kernels run now: a
    time for each candidate (an entry written before a candidate was added, at an older revision of its
    kind, ``REVISIONS``, or where it times gpt2lab.native's kernels, on another build of them, ``native``,
    is measured again, and so is one with a time that is not a number >= 0; an edited one without
    times is taken as it is), where a kernel reads a copy of the weight, the time of making the copy
    (``pack``, or ``pack <kernel>``: ``pack_key``), which ``KernelTable.pack_repays`` weighs against
    its saving, and for a product of few rows, how much was read to evict the cache before each timed
    call (``evicted_mb``; one measured without the eviction is measured again)."""
    us = entry.get("us_per_product")
    us = us if isinstance(us, dict) else {}
    if not us:
        return True
    if not all(_is_time(t) for t in us.values()):  # an edit that left a time unreadable
        return False
    if entry.get("revision", 1) != REVISIONS.get(kind, 1):
        return False
    build = _native_build(options)
    if build is not None and entry.get("native") != build:
        return False
    if streams(rows, kind) and "evicted_mb" not in entry:
        return False
    return set(options) <= us.keys() and {pack_key(k) for k in options if k in COPY_KERNELS} <= us.keys()


def _native_build(options: tuple[str, ...]) -> str | None:
    """The build of gpt2lab.native's kernels (``native.source_digest``) where ``options`` has one of them."""
    return native.source_digest() if any(k in NATIVE_KERNELS for k in options) else None


def _is_time(t: object) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t >= 0


def alternated(
    fns: dict, rounds: int, sync=lambda: None, warmup: int = 1, before=lambda: None
) -> dict[str, list[float]]:
    """Seconds of every call of each function, called in turn for ``rounds`` rounds after ``warmup`` calls
    of each, so a busy machine slows all alike; ``sync`` waits for queued device work around each call,
    and ``before`` runs, untimed, before each timed call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            before()
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return times


def last_level_cache() -> int | None:
    """Bytes of the largest cache of the CPU this process runs on (Linux's sysfs: the shared L3 on
    x86), or None where it does not say."""
    sizes = []
    for index in CPU_CACHES.glob("index*"):
        try:
            size = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:].upper(), 1)
        digits = size[:-1] if unit > 1 else size
        if digits.isdigit():
            sizes.append(int(digits) * unit)
    return max(sizes) if sizes else None


def streams(rows: int, kind: str) -> bool:
    """Whether a ``kind`` product of ``rows`` rows reads what a decode step streams from memory: the
    weights of a product of few rows, read once a step, and the KV cache a step's attention reads
    (every weight of the step streamed through the caches since); not a GELU on its own (its input is
    the output just made), nor a prompt's attention (its keys were just made)."""
    return kind == "attention" or (rows <= FEW_ROWS and kind not in ("tanh_gelu", "causal"))


def evicted_before(rows: int, kind: str = "float32") -> int:
    """The bytes ``measure`` reads before each timed product of ``rows`` rows: ``eviction_bytes()``
    where it streams what it reads (``streams``), else none."""
    return eviction_bytes() if streams(rows, kind) else 0


def eviction_bytes() -> int:
    """How many bytes ``measure`` reads before each timed product of few rows: ``EVICT_FACTOR`` times the
    last-level cache, at most an eighth of the memory available; 0 where the cache's size is not known."""
    cache, spare = last_level_cache(), available_memory()
    if not cache:
        return 0
    wanted = int(EVICT_FACTOR * cache)
    return wanted if spare is None else min(wanted, spare // 8)


def _evictor(nbytes: int):
    """A function that reads ``nbytes`` of its own (pushing other data out of the caches), or does
    nothing for 0."""
    if nbytes <= 0:
        return lambda: None
    filler = torch.ones(nbytes // 4)
    return filler.sum


def _runner(kind: str, kernel: str, n: int, k: int, copies: int, x: torch.Tensor, gelu_form: str = "tanh"):
    """A function that runs ``kernel`` on x by each of ``copies`` distinct (n, k) weights (kind
    ``tanh_gelu``: the form ``kernel`` over each of ``copies`` (rows, n) outputs, in place as the
    layers apply it: a few applications keep the values far from float32's subnormals; kind
    ``attention``: n query heads of size k over each of ``copies`` caches of x's row count of keys; kind
    ``causal``: n query heads of size k over x's row count of queries, keys and values, strided views of
    one (1, rows, 3n, k) tensor as the model's fused product gives them)."""
    if kind == "tanh_gelu":
        outputs = [torch.linspace(-4, 4, n).expand(len(x), n).contiguous() for _ in range(copies)]
        return lambda: [ops.tanh_gelu_(y, kernel) for y in outputs]
    if kind == "attention":  # n query heads of size k over len(x) keys, each copy a layer's cache
        q, keys = torch.full((1, n, 1, k), 0.5), len(x)
        # the written part of a cache twice as long, as a step reads it (GPT.setup_cache: heads apart)
        caches = [torch.full((2, 1, n, 2 * keys, k), 0.01)[:, :, :, :keys] for _ in range(copies)]
        return lambda: [ops.one_query_attention(q, key, value, None, False, kernel) for key, value in caches]
    if kind == "causal":  # n query heads of size k over x's row count of queries and keys, as the model splits them
        made = torch.Generator().manual_seed(0)  # not the process's own random numbers
        fused = [torch.randn(1, len(x), 3 * n, k, generator=made).transpose(1, 2) for _ in range(copies)]
        return lambda: [ops.causal_attention(*heads.split(n, dim=1), kernel) for heads in fused]
    if kind == "int8":
        scale = torch.full((n,), 0.01)
        packed = [ops.pack_int8(torch.full((n, k), 3, dtype=torch.int8), scale, None, kernel) for _ in range(copies)]
        return lambda: [ops.int8_linear(x, p, kernel) for p in packed]
    weights = [torch.full((n, k), 0.01) for _ in range(copies)]
    if kind == "gelu":  # the product and its activation, fused or one after the other
        return lambda: [ops.linear_gelu(x, w, kernel=kernel, form=gelu_form) for w in weights]
    if kernel in COPY_KERNELS:
        laid = [ops.copy_weight(w, len(x), kernel) for w in weights]
        return lambda: [ops.copy_linear(x, c, kernel, w, None) for c, w in zip(laid, weights, strict=True)]
    return lambda: [ops.linear(x, w, kernel=kernel) for w in weights]
