"""The ``gpt2lab`` command line: a table of subcommands, each a list of options (data) and one function
that calls the library and prints. Errors a user can fix are one line on stderr (no traceback) and a
non-zero exit status; under torchrun rank 0 prints it, and another rank only where rank 0 did not fail too.

Nothing here imports torch until a command runs, so ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import NoReturn

from gpt2lab import files
from gpt2lab.errors import GPT2LabError, first_line

BUSY_CPUS = 0.5  # other programs' load (CPUs) at which OpenMP threads sleep instead of spinning


@dataclass
class Command:
    help: str
    run: Callable[[argparse.Namespace], None]
    options: list[tuple[tuple[str, ...], dict]] = field(default_factory=list)
    settings: str | None = None  # free-form --section.key=value settings: the usage line that shows them
    epilog: Callable[[], str] | None = None  # long help below the options (may import what it describes)


def opt(*names: str, **kwargs) -> tuple[tuple[str, ...], dict]:
    return names, kwargs


MODEL_OPTIONS = [
    opt(
        "--model",
        default="gpt2",
        help="an HF GPT-2 directory, a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), or a gpt2lab directory "
        "(save_pretrained, convert, export, or a training out_dir). Default: gpt2",
    ),
    opt("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"),
    opt(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype (default: float32 on CPU, bfloat16 on GPU)",
    ),
    opt("--int8", action="store_true", help="int8 linear layers (CPU, float32): faster decoding, small logit error"),
]


# --- the commands: each calls one library function and prints ---------------------------------------


def _predict(args: argparse.Namespace) -> None:
    from gpt2lab.generation import next_token_probs
    from gpt2lab.load import load_for_inference

    if args.top < 1:
        raise GPT2LabError(f"--top must be at least 1, got {args.top}")
    model, tok = load_for_inference(args.model, args.device, args.dtype, args.int8)
    ranked = next_token_probs(model, _encode(tok, args.text), args.top)
    print(f"{'rank':>4}  {'id':>6}  {'prob':>8}  token")
    for rank, (i, p) in enumerate(ranked, 1):
        print(f"{rank:>4}  {i:>6}  {p:8.4f}  {tok.decode([i])!r}")


def _generate(args: argparse.Namespace) -> None:
    from gpt2lab.generation import check_sampling, generate, stream_text
    from gpt2lab.load import load_for_inference

    if args.num_samples < 1:
        raise GPT2LabError(f"--num-samples must be at least 1, got {args.num_samples}")
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before a model loads
    model, tok = load_for_inference(args.model, args.device, args.dtype, args.int8)
    ids = _encode(tok, args.prompt)
    sampling = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.compile:
        print(
            "compiling the decode step before the first new token (up to a minute; seconds where inductor's "
            "cache already holds it)",
            file=sys.stderr,
            flush=True,
        )
    if args.num_samples == 1:  # stream_text stops at the tokenizer's own end of text
        pieces = stream_text(model, tok, ids, args.max_new_tokens, **sampling, compile=args.compile)  # checks first
        started = False  # the prompt comes with the first piece, so a failing first step prints no text
        try:
            for piece in pieces:
                print(piece if started else args.prompt + piece, end="", flush=True)
                started = True
        finally:
            if started:  # end the text's line, also before an error printed below it
                print(flush=True)
        if not started:  # nothing new: at once the end of text, or --max-new-tokens 0
            print(args.prompt)
        return
    rows = generate(
        model, [ids] * args.num_samples, args.max_new_tokens, **sampling, eos_id=tok.eot_token, compile=args.compile
    )
    for i, row in enumerate(rows):
        text = tok.decode(row[:-1] if row and row[-1] == tok.eot_token else row)  # the end of text is not part of it
        print(f"--- sample {i + 1} ---\n{args.prompt}{text}")


def _convert(args: argparse.Namespace) -> None:
    from gpt2lab.convert import convert_to_gqa
    from gpt2lab.load import load_for_rewrite, save_pretrained, tokenizer_of

    model, out = load_for_rewrite(args.model, args.out)
    converted = convert_to_gqa(model, args.n_kv_head, args.method)
    save_pretrained(converted, out, tokenizer_of(args.model))
    if args.n_kv_head == model.config.n_kv_head:
        print(f"{args.model} has {args.n_kv_head} key/value heads already: wrote an unchanged copy to {out}")
        return
    print(
        f"converted {args.model}: {model.config.n_kv_head} -> {args.n_kv_head} key/value heads "
        f"({model.num_params():,} -> {converted.num_params():,} parameters); wrote {out}\n"
        f"fine-tune it briefly to recover quality: gpt2lab train --model.init={out} --data.dir=DATA"
    )


def _prepare(args: argparse.Namespace) -> None:
    from gpt2lab.data import Source, prepare

    source = Source(tuple(args.input or ()), args.corpus, args.text_field, args.max_docs)
    summary = prepare(
        args.out, source, val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, workers=args.workers
    )
    for warning in summary.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(summary)


def _train(args: argparse.Namespace) -> None:
    from gpt2lab.train import train
    from gpt2lab.train_config import TrainConfig

    train(TrainConfig.load(args.config, args.overrides))


def _eval(args: argparse.Namespace) -> None:
    from gpt2lab import checkpoint
    from gpt2lab.eval import score_path
    from gpt2lab.load import load_for_inference

    model, tok = load_for_inference(args.model, args.device, args.dtype, args.int8)
    block = args.block_size if args.block_size is not None else checkpoint.trained_length(args.model)
    score, block, stride = score_path(model, tok, args.data, block, args.stride, args.batch_size)
    print(f"{score.tokens:,} token{'s' if score.tokens != 1 else ''} scored (block {block}, stride {stride}): {score}")


def _export(args: argparse.Namespace) -> None:
    from gpt2lab import checkpoint
    from gpt2lab.load import load_for_rewrite, save_pretrained, tokenizer_of

    model, out = load_for_rewrite(args.model, args.out)
    written = save_pretrained(model, out, tokenizer_of(args.model))
    taken = f" ({checkpoint.find(args.model).name})" if checkpoint.is_training_dir(args.model) else ""
    print(f"exported {args.model}{taken} ({written:,} parameters) to {out}")


def _demo(args: argparse.Namespace) -> None:
    from gpt2lab.demo import run_demo

    run_demo(args.out, args.overrides)


def _compare(args: argparse.Namespace) -> None:
    from gpt2lab.compare import compare
    from gpt2lab.compare.settings import load_config

    profile = "quick" if args.quick else args.profile
    named = {"compare.variants": args.variants, "compare.seeds": args.seeds, "data.dir": args.data}
    cfg = load_config(args.config, args.overrides, profile=profile, named=named | {"run.steps": args.steps})
    command = ["gpt2lab compare"]
    for flag in ("config", "variants", "seeds", "data", "steps", "out"):
        if getattr(args, flag) is not None:
            command.append(f"--{flag} {getattr(args, flag)}")
    command += [f"--profile {profile}"] * (profile != "default") + list(args.overrides)
    results = compare(cfg, args.out, " ".join(command), progress=not args.no_progress, dry_run=args.dry_run)
    if args.dry_run:
        print(f"dry run: every model of the {results['jobs']} jobs builds and trains a step; nothing was written")
    else:
        print(f"compared in {results['runtime_s'] / 60:.1f} min; see {args.out}/report.md")


def _encode(tokenizer, text: str) -> list[int]:
    if not text:
        raise GPT2LabError("the prompt is empty; give some text to continue, e.g. 'Hello, my name is'")
    return tokenizer.encode(text, allowed_special="all")


def _train_epilog() -> str:
    from gpt2lab.train_config import describe_train_config

    return (
        "Every setting below can be given in the TOML file ([section] then key = value) and overridden on the\n"
        "command line as --section.key=value. Multi-process: torchrun --nproc_per_node=N -m gpt2lab train\n"
        "--run.strategy=ddp|fsdp ... Running the same command again resumes from the newest checkpoint.\n\n"
        + describe_train_config()
    )


def _compare_epilog() -> str:
    from gpt2lab.compare.settings import describe_compare_config

    return (
        "Settings come from the profile, then --config, then --section.key=value, then the options above.\n"
        "A file setting model.preset drops the profile's model size. The plan (jobs, steps, estimated time)\n"
        "is printed before anything runs. Writes OUT/report.md, OUT/results.json and OUT/*.png; every job's\n"
        "directory is kept under OUT/runs (data under OUT/data), and a rerun\n"
        "with the same settings reuses finished runs.\n\n" + describe_compare_config()
    )


COMMANDS: dict[str, Command] = {
    "predict": Command(
        "show the most likely next tokens after a text, with probabilities",
        _predict,
        [
            opt("text", help="the text to continue"),
            opt("--top", type=int, default=10, help="how many candidate tokens to list (default 10)"),
            *MODEL_OPTIONS,
        ],
    ),
    "generate": Command(
        "continue a prompt (one sample streams its tokens as they are produced)",
        _generate,
        [
            opt("--prompt", required=True, help="text to continue"),
            opt("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)"),
            opt("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)"),
            opt("--top-k", type=int, default=None, help="sample only from the k most likely tokens"),
            opt("--top-p", type=float, default=None, help="sample from the smallest set with probability >= p"),
            opt("--seed", type=int, default=None, help="random seed, for reproducible samples"),
            opt("--num-samples", type=int, default=1, help="independent samples of the prompt (batched)"),
            opt(
                "--compile",
                action="store_true",
                help="torch.compile the decode step (CUDA graphs on a GPU; on the CPU a C++ wrapper with the "
                "weights frozen in and the products autotuned), after a compile of 20-60 s: several times faster "
                "per token on a GPU; on the CPU timed against the eager step on its first tokens, and the faster "
                "one decodes (which one depends on the CPU and the batch: docs/benchmarks.md has both per CPU). "
                "A float32 sample where the CPU reads one row fastest with MKL stays in inductor's "
                "on-disk cache, so later runs compile it in seconds; a step on weights laid out for inductor's "
                "kernels holds a copy of them while the process lives, and an int8 step on fbgemm or oneDNN compiles "
                "in each process",
            ),
            *MODEL_OPTIONS,
        ],
    ),
    "convert": Command(
        "turn a multi-head model into grouped-query attention by pooling each group's key/value heads",
        _convert,
        [
            opt(
                "--model",
                required=True,
                help="the model to convert: an HF GPT-2 directory, a hub name (gpt2, ...) or a gpt2lab directory",
            ),
            opt(
                "--n-kv-head",
                type=int,
                required=True,
                help="key/value heads of the result; must divide the model's count (1 = multi-query)",
            ),
            opt(
                "--method",
                choices=["mean", "first"],
                default="mean",
                help="each new key/value head is the mean of its group's heads (default; the GQA paper's "
                "recipe) or the group's first head",
            ),
            opt("--out", required=True, help="directory to write the converted model to (HF format)"),
        ],
    ),
    "prepare": Command(
        "tokenize a text corpus into token shards with a train/val split, for training",
        _prepare,
        [
            opt(
                "--input",
                nargs="+",
                metavar="PATH",
                group="source",
                help="what to tokenize: text files (one document each), directories (every text file below, "
                "sorted; hidden ones and binary files skipped), globs such as 'books/**/*.txt' (quote them), or "
                ".jsonl files (one JSON object per line, one document each; also where a directory or glob "
                "finds them, so they need --text-field's field); files must be UTF-8",
            ),
            opt(
                "--corpus",
                choices=["stdlib", "shakespeare"],
                group="source",
                help="a named corpus instead: stdlib = this Python's standard library sources (offline, about "
                "12 MB); shakespeare = tiny-shakespeare, downloaded and checked by sha256",
            ),
            opt(
                "--out",
                required=True,
                metavar="DIR",
                help="directory to write: train_NNNNNN.bin / val_NNNNNN.bin (uint16 tokens) and meta.json; a "
                "previous prepared directory there is replaced only once the new one is complete (refused "
                "where it holds other files, which replacing it would delete)",
            ),
            opt(
                "--val-fraction",
                type=float,
                default=0.01,
                metavar="F",
                help="share of documents held out for validation, spread evenly (default 0.01); a corpus with "
                "too few documents holds out its last one, a single document its last tokens; val gets at least "
                "1,025 tokens where the corpus has ten times that",
            ),
            opt(
                "--shard-tokens",
                type=int,
                default=10_000_000,
                metavar="N",
                help="tokens per shard file (default 10,000,000)",
            ),
            opt(
                "--workers", type=int, default=None, metavar="N", help="tokenizer processes (default: one per CPU core)"
            ),
            opt(
                "--text-field",
                default="text",
                metavar="NAME",
                help="the field holding the text in .jsonl inputs (default: text)",
            ),
            opt(
                "--max-docs",
                type=int,
                default=None,
                metavar="N",
                help="stop after this many documents (a quick sample)",
            ),
        ],
    ),
    "train": Command(
        "train or fine-tune a model (one process, or DDP/FSDP under torchrun); reruns resume",
        _train,
        [opt("--config", metavar="FILE.toml", help="a TOML file with [model], [data], [optim], [run] tables")],
        settings="%(prog)s [-h] [--config FILE.toml] [--section.key=value ...]",
        epilog=_train_epilog,
    ),
    "eval": Command(
        "loss, perplexity and bits per byte of a model on a prepared data directory (val split) or a text file",
        _eval,
        [
            opt(
                "--data",
                required=True,
                metavar="DIR|FILE",
                help="a directory made by gpt2lab prepare (its val split is scored) or a UTF-8 text file (tokenized here)",
            ),
            opt(
                "--block-size",
                type=int,
                default=None,
                help="tokens per window (default: for a training out_dir or checkpoint, the length it trained at, "
                "data.block_size; else the model's block_size, its context)",
            ),
            opt(
                "--stride",
                type=int,
                default=None,
                help="tokens between window starts; each window scores only tokens no earlier window scored, so a "
                "stride below the block size gives every token more context (default: block size / 2)",
            ),
            opt("--batch-size", type=int, default=8, help="windows per forward pass (default 8)"),
            *MODEL_OPTIONS,
        ],
    ),
    "export": Command(
        "write a model (e.g. the newest checkpoint of a training run) as an HF-format directory",
        _export,
        [
            opt(
                "--model",
                required=True,
                help="a training out_dir (newest complete checkpoint), one checkpoint directory, or any loadable model",
            ),
            opt("--out", required=True, help="directory to write config.json, model.safetensors and tokenizer files"),
        ],
    ),
    "demo": Command(
        "the whole pipeline offline: prepare a corpus, train a small GPT-2 on the CPU, sample",
        _demo,
        [
            opt(
                "--out",
                default="runs/demo",
                metavar="DIR",
                help="where the corpus, checkpoints and metrics go (default runs/demo)",
            )
        ],
        settings="%(prog)s [-h] [--out DIR] [--section.key=value ...]",
        epilog=lambda: "Training settings (see gpt2lab train --help) override the demo's, e.g. --run.steps=100.",
    ),
    "compare": Command(
        "train each architectural variant on the same data and budget; report what each costs and buys",
        _compare,
        [
            opt(
                "--config",
                metavar="FILE.toml",
                help="[model] [data] [optim] [run] tables as for train, plus [compare] and one per experiment",
            ),
            opt(
                "--variants",
                metavar="A,B,...",
                help="language-model variants (compare.variants): baseline, or changes joined by '+' "
                "from rope, gqa, mqa, swa, mixed",
            ),
            opt("--seeds", type=int, metavar="N", help="seeds per variant (compare.seeds)"),
            opt(
                "--data",
                metavar="DIR",
                help="a prepared data directory (default: the offline stdlib corpus, prepared in OUT/data)",
            ),
            opt("--steps", type=int, metavar="N", help="training steps per run (run.steps)"),
            opt("--out", default="compare", metavar="DIR", help="output directory (default: compare)"),
            opt(
                "--profile",
                default="default",
                choices=["default", "quick", "full", "gpu"],
                help="the defaults: default (about 45 min on 2 CPU cores), quick (a smoke test of every code path), "
                "full (3x the steps, about 1.5 h), gpu (one H100/H200, about 5 min)",
            ),
            opt("--quick", action="store_true", help="the same as --profile quick"),
            opt(
                "--dry-run",
                action="store_true",
                help="build every model of the plan, run one training step of each shape on the CPU, print the plan "
                "and its time estimate (less the jobs --out already holds), and stop; nothing is written",
            ),
            opt("--no-progress", action="store_true", help="no progress bars"),
        ],
        settings="%(prog)s [-h] [--config FILE.toml] [--variants A,B,...] [--seeds N] [--data DIR] [--steps N] "
        "[--out DIR] [--profile NAME] [--quick] [--dry-run] [--no-progress] [--section.key=value ...]",
        epilog=_compare_epilog,
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed; only ``command``'s own options are built (None: all),
    since some epilogs import modules to describe their settings."""
    parser = argparse.ArgumentParser(
        prog="gpt2lab", description="GPT-2 and its modern variants: load, generate, train, compare."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        p = sub.add_parser(name, help=spec.help, description=spec.help[0].upper() + spec.help[1:] + ".")
        if command not in (None, name):
            continue
        groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
        for names, kwargs in spec.options:
            kwargs = dict(kwargs)
            group = kwargs.pop("group", None)
            if group is not None and group not in groups:
                groups[group] = p.add_mutually_exclusive_group(required=True)
            (p if group is None else groups[group]).add_argument(*names, **kwargs)
        if spec.settings:
            p.usage = spec.settings
            p.set_defaults(overrides=[])
        if spec.epilog:
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            p.epilog = spec.epilog()
        p.set_defaults(func=spec.run, command_parser=p)  # command_parser: for usage errors found after parsing
    return parser


def cpu_busy(seconds: float = 0.1) -> float | None:
    """How many CPUs' worth of work other programs ran over the next ``seconds`` (Linux's /proc/stat:
    the non-idle share of all CPU time, times the CPUs this process may use); None where unknown."""

    def times() -> list[int]:
        with open("/proc/stat") as f:
            return [int(v) for v in f.readline().split()[1:]]

    try:
        before = times()
        time.sleep(seconds)
        after = times()
        cpus = len(os.sched_getaffinity(0))
    except (OSError, ValueError, AttributeError):
        return None
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total, idle = sum(delta), sum(delta[3:5])  # idle and iowait
    return (total - idle) / total * cpus if total > 0 else None


def openmp_wait_policy(environ: MutableMapping[str, str], busy: Callable[[], float | None] = cpu_busy) -> None:
    """Choose how torch's OpenMP threads wait between parallel regions, before torch loads it (the
    runtime reads the environment once). A decode step is dozens of short products: on an idle CPU,
    threads that spin briefly (OpenMP's default) start the next product at once; where other programs
    already keep ``BUSY_CPUS`` busy, a spinning thread takes the time slice its partner needs, so they
    sleep instead (OMP_WAIT_POLICY=PASSIVE). The load is measured first (``busy``, a tenth of a
    second); docs/benchmarks.md has both cases' figures. A policy the user set (OMP_WAIT_POLICY or
    GOMP_SPINCOUNT) is kept."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return
    load = busy()
    if load is not None and load >= BUSY_CPUS:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    named = next((a for a in argv if not a.startswith("-")), "")  # the subcommand, if any (no top-level options)
    parser = build_parser(named)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):  # only train, demo and compare take --section.key=value settings
            getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    openmp_wait_policy(os.environ)
    code = _run(args)
    if args.func is _train and "RANK" in os.environ:
        _exit_torchrun_worker(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        args.func(args)
    except GPT2LabError as e:
        _print_error(str(e))
        return 2
    except BrokenPipeError:  # the reader of our output went away (| head): stop quietly, as Unix tools do
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except OSError as e:  # a path the OS refused (an output under a file, a read-only place)
        if not isinstance(e.filename, (str, bytes, os.PathLike)):
            raise
        _print_error(files.os_error_message(e))
        return 2
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if isinstance(e.__context__, KeyboardInterrupt):  # a second Ctrl-C inside a write torch wraps (torch.save)
            return _interrupted()
        message = first_line(e)
        if not isinstance(e, MemoryError) and "out of memory" not in message and "can't allocate memory" not in message:
            raise
        _print_error(
            f"out of memory ({message}); lower the batch size, the block size or --max-new-tokens, "
            "or use a smaller model"
        )
        return 2
    except KeyboardInterrupt:
        return _interrupted()
    return 0


def _interrupted() -> int:
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print("\ninterrupted", file=sys.stderr)
    return 130


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that flushing it at exit does not fail once more."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured, closed): nothing to flush there
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


RANK_ERROR_DELAY_S = 3.0  # how long a torchrun rank other than 0 waits before it prints its error


def _print_error(message: str) -> None:
    """``error: message`` on stderr. Under torchrun every rank usually meets the same error, and the first
    to exit makes torchrun end the others: so rank 0 prints at once, and any other rank only after a pause in
    which torchrun ends it if rank 0 failed too (an error of its own still reaches the user)."""
    if os.environ.get("RANK", "0") != "0":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # torchrun's ending is not a graceful-stop request here
        time.sleep(RANK_ERROR_DELAY_S)
    print(f"error: {message}", file=sys.stderr)


def _exit_torchrun_worker(code: int) -> NoReturn:
    """End a torchrun training process without the interpreter's shutdown.

    Once DDP, FSDP or distributed checkpointing has used a gloo process group, torch keeps it, and its
    worker threads, alive past ``destroy_process_group``. A worker that releases the last collective's
    tensors while the interpreter shuts down must take the GIL, and Python ends the thread instead, which
    aborts the process ("terminate called without an active exception", SIGABRT) after a run that
    succeeded. Everything the run wrote is closed by now; only buffered output remains to flush.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
