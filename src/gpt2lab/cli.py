"""The ``gpt2lab`` command line. Each subcommand is a small function; errors a user can fix are
printed as one line (no traceback) with a non-zero exit status."""

from __future__ import annotations

import argparse
import codecs
import sys
from collections.abc import Callable

from gpt2lab.errors import GPT2LabError

COMMANDS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def command(name: str, help: str):
    """Register ``fn(parser)`` as the builder of subcommand ``name``; it sets ``func`` via set_defaults."""

    def register(fn):
        COMMANDS[name] = (fn, help)
        return fn

    return register


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="gpt2",
        help="an HF GPT-2 directory, a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl), "
        "or a gpt2lab directory (save_pretrained, convert, or a training out_dir). Default: gpt2",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weight dtype (default: float32 on CPU, bfloat16 on GPU)",
    )
    p.add_argument(
        "--int8", action="store_true", help="int8 linear layers (CPU, float32): faster decoding, small logit error"
    )


def load_model_from_args(args: argparse.Namespace):
    import torch

    from gpt2lab.hf import load_pretrained, resolve
    from gpt2lab.tokenizer import load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise GPT2LabError(f"device {device!r} is not usable here ({e}); try --device cpu") from None
    model = load_pretrained(args.model, device=device).to(getattr(torch, dtype)).eval()
    if args.int8:
        from gpt2lab.quantize import quantize_int8

        model = quantize_int8(model)
    return model, load_tokenizer(resolve(args.model))


def load_for_rewrite(model: str, out: str):
    """The model named by --model and the --out path to write a new version of it to (never its own directory)."""
    from pathlib import Path

    from gpt2lab.hf import load_pretrained, resolve

    source, target = resolve(model), Path(out).expanduser()
    if target.exists() and target.resolve() == source.resolve():
        raise GPT2LabError(f"--out {target} is the model's own directory; write the new model elsewhere")
    return load_pretrained(source), target


def encode_prompt(tokenizer, text: str) -> list[int]:
    if not text:
        raise GPT2LabError("the prompt is empty; give some text to continue, e.g. 'Hello, my name is'")
    return tokenizer.encode(text, allowed_special="all")


@command("predict", "show the most likely next tokens after a text, with probabilities")
def _predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help="the text to continue")
    p.add_argument("--top", type=int, default=10, help="how many candidate tokens to list (default 10)")
    add_model_args(p)

    def run(args):
        import torch

        model, tok = load_model_from_args(args)
        ids = encode_prompt(tok, args.text)
        limit = model.config.max_positions
        if limit is not None and len(ids) > limit:
            raise GPT2LabError(f"the text is {len(ids)} tokens, longer than the model's context of {limit}; shorten it")
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids], device=model.wte.weight.device))
        probs = logits[0, -1].float().softmax(-1)
        top = probs.topk(min(args.top, probs.numel()))
        print(f"{'rank':>4}  {'id':>6}  {'prob':>8}  token")
        for rank, (pr, i) in enumerate(zip(top.values.tolist(), top.indices.tolist(), strict=True), 1):
            print(f"{rank:>4}  {i:>6}  {pr:8.4f}  {tok.decode([i])!r}")

    p.set_defaults(func=run)


@command("generate", "continue a prompt, streaming tokens as they are produced")
def _generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 = greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set with probability >= p")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible samples")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the prompt (batched)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step: on a GPU it runs as CUDA graphs, several times faster for long "
        "generations; on the CPU the default eager step is the faster one (docs/benchmarks.md)",
    )
    add_model_args(p)

    def run(args):
        from gpt2lab.generation import stream
        from gpt2lab.tokenizer import EOT

        if args.num_samples < 1:
            raise GPT2LabError("--num-samples must be at least 1")
        model, tok = load_model_from_args(args)
        ids = encode_prompt(tok, args.prompt)
        if args.num_samples == 1:
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            tokens = stream(  # checks the arguments: an error comes before any output
                model,
                [ids],
                args.max_new_tokens,
                args.temperature,
                args.top_k,
                args.top_p,
                args.seed,
                compile=args.compile,
            )
            sys.stdout.write(args.prompt)
            for token in tokens:
                if int(token[0]) == EOT:  # the end of the text, not part of it
                    break
                sys.stdout.write(decoder.decode(tok.decode_single_token_bytes(int(token[0]))))
                sys.stdout.flush()
            sys.stdout.write(decoder.decode(b"", final=True) + "\n")
            return
        from gpt2lab.generation import generate

        rows = generate(
            model,
            [ids] * args.num_samples,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.top_p,
            args.seed,
            compile=args.compile,
        )
        for i, row in enumerate(rows):
            print(f"--- sample {i + 1} ---\n{args.prompt}{tok.decode(row)}")

    p.set_defaults(func=run)


@command("convert", "turn a multi-head model into grouped-query attention by mean-pooling key/value heads")
def _convert(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="the model to convert: an HF GPT-2 directory, a hub name (gpt2, ...) or a gpt2lab directory",
    )
    p.add_argument(
        "--n-kv-head",
        type=int,
        required=True,
        help="key/value heads of the result; must divide the model's count (1 = multi-query)",
    )
    p.add_argument("--out", required=True, help="directory to write the converted model to (HF format)")

    def run(args):
        from gpt2lab.convert import convert_to_gqa
        from gpt2lab.hf import save_pretrained

        model, out = load_for_rewrite(args.model, args.out)
        converted = convert_to_gqa(model, args.n_kv_head)
        save_pretrained(converted, out)
        print(
            f"converted {args.model}: {model.config.n_kv_head} -> {args.n_kv_head} key/value heads "
            f"({model.num_params():,} -> {converted.num_params():,} parameters); wrote {out}\n"
            f"fine-tune it briefly to recover quality (pass --model {out})"
        )

    p.set_defaults(func=run)


@command("prepare", "tokenize a text corpus into token shards with a train/val split, for training")
def _prepare(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        metavar="PATH",
        help="what to tokenize: text files (one document each), directories (every file below, sorted; hidden "
        "ones skipped), globs such as 'books/**/*.txt' (quote them), or .jsonl files (one JSON object per "
        "line, one document each); files must be UTF-8",
    )
    source.add_argument(
        "--corpus",
        choices=["stdlib", "shakespeare"],
        help="a named corpus instead: stdlib = this Python's standard library sources (offline, about 12 MB); "
        "shakespeare = tiny-shakespeare, downloaded and checked by sha256",
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="directory to write: train_NNNNNN.bin / val_NNNNNN.bin (uint16 tokens) and meta.json; a previous "
        "prepared directory there is replaced only once the new one is complete",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.01,
        metavar="F",
        help="share of documents held out for validation, spread evenly (default 0.01); a corpus with too few "
        "documents holds out its last one, a single document its last tokens",
    )
    p.add_argument(
        "--shard-tokens", type=int, default=10_000_000, metavar="N", help="tokens per shard file (default 10,000,000)"
    )
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="tokenizer processes (default: one per CPU core)"
    )
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="the field holding the text in .jsonl inputs (default: text)",
    )
    p.add_argument(
        "--max-docs", type=int, default=None, metavar="N", help="stop after this many documents (a quick sample)"
    )

    def run(args):
        from gpt2lab.data import prepare

        summary = prepare(
            args.out,
            args.input or (),
            args.corpus,
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            workers=args.workers,
            text_field=args.text_field,
            max_docs=args.max_docs,
        )
        print(summary)

    p.set_defaults(func=run)


@command("train", "train or fine-tune a model (one process, or DDP/FSDP under torchrun); reruns resume")
def _train(p: argparse.ArgumentParser) -> None:
    from gpt2lab.config import describe_train_config

    p.usage = "%(prog)s [-h] [--config FILE.toml] [--section.key=value ...]"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "Every setting below can be given in the TOML file ([section] then key = value) and overridden on the\n"
        "command line as --section.key=value. Multi-process: torchrun --nproc_per_node=N -m gpt2lab train\n"
        "--run.strategy=ddp|fsdp ... Running the same command again resumes from the newest checkpoint.\n\n"
        + describe_train_config()
    )
    p.add_argument("--config", metavar="FILE.toml", help="a TOML file with [model], [data], [optim], [run] tables")
    p.set_defaults(overrides=[])

    def run(args):
        from gpt2lab.config import TrainConfig
        from gpt2lab.train import train

        train(TrainConfig.load(args.config, args.overrides))

    p.set_defaults(func=run)


@command("eval", "loss and perplexity of a model on a prepared data directory (val split) or a text file")
def _eval(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR|FILE",
        help="a directory made by gpt2lab prepare (its val split is scored) or a UTF-8 text file (tokenized here)",
    )
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="tokens per window (default: the model's context; 1024 for rotary models)",
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts; each window scores only tokens no earlier window scored, so a "
        "stride below the block size gives every token more context (default: block size / 2)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    add_model_args(p)

    def run(args):
        import math
        from pathlib import Path

        from gpt2lab.data import TokenData
        from gpt2lab.train import perplexity

        path = Path(args.data).expanduser()
        if not path.exists():
            raise GPT2LabError(f"--data {path} does not exist; give a prepared directory or a text file")
        if args.batch_size < 1:
            raise GPT2LabError("--batch-size must be at least 1")
        model, tok = load_model_from_args(args)
        limit = model.config.max_positions
        block_size = args.block_size or limit or 1024
        if block_size < 1 or (limit is not None and block_size > limit):
            raise GPT2LabError(f"--block-size must be between 1 and the model's context ({limit}), got {block_size}")
        stride = args.stride or max(1, block_size // 2)
        if path.is_dir():
            data = TokenData(path, "val")
            tokens = data.read(0, len(data))
        else:
            tokens = tok.encode_ordinary(path.read_text(encoding="utf-8", errors="replace"))
        if len(tokens) < 2:
            raise GPT2LabError(f"{path} has {len(tokens)} token(s); scoring needs at least 2")
        loss, n = perplexity(model, tokens, block_size, stride, args.batch_size)
        print(
            f"{n:,} tokens scored (block {block_size}, stride {stride}): loss {loss:.4f}, perplexity {math.exp(loss):.3f}"
        )

    p.set_defaults(func=run)


@command("export", "write a model (e.g. the newest checkpoint of a training run) as an HF-format directory")
def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a training out_dir (newest complete checkpoint), one checkpoint directory, or any loadable model",
    )
    p.add_argument("--out", required=True, help="directory to write config.json, model.safetensors and tokenizer files")

    def run(args):
        from gpt2lab.hf import save_pretrained

        model, out = load_for_rewrite(args.model, args.out)
        save_pretrained(model, out)
        print(f"exported {args.model} ({model.num_params():,} parameters) to {out}")

    p.set_defaults(func=run)


@command("demo", "the whole pipeline offline: prepare a corpus, train a small GPT-2 (~3 min on CPU), sample")
def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/demo", help="where the corpus, checkpoints and metrics go (default runs/demo)"
    )
    p.usage = "%(prog)s [-h] [--out DIR] [--section.key=value ...]"
    p.epilog = "Training settings (see gpt2lab train --help) override the demo's, e.g. --run.steps=100."
    p.set_defaults(overrides=[])

    def run(args):
        from gpt2lab.demo import run_demo

        run_demo(args.out, args.overrides)

    p.set_defaults(func=run)


@command("compare", "train each architectural variant on the same data and budget; report what each costs and buys")
def _compare(p: argparse.ArgumentParser) -> None:
    from gpt2lab.compare_config import DEFAULT_VARIANTS, describe_compare_config

    p.usage = "%(prog)s [-h] [--config FILE.toml] [--variants A,B,...] [--seeds N] [--data DIR] [--out DIR] [--section.key=value ...]"
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (
        "Settings come from the built-in CPU default (about 15 minutes on 2 cores), then --config, then\n"
        "--section.key=value, then the options above. A file setting model.preset drops the default model\n"
        "size. Writes OUT/report.md, OUT/results.json and OUT/*.png; runs and data are kept under OUT/runs\n"
        "and OUT/data, and a rerun with the same settings reuses finished runs.\n\n" + describe_compare_config()
    )
    p.add_argument(
        "--config", metavar="FILE.toml", help="[model] [data] [optim] [run] tables as for train, plus [compare]"
    )
    p.add_argument(
        "--variants",
        metavar="A,B,...",
        help=f"variants to compare (default {','.join(DEFAULT_VARIANTS)}): baseline, or changes joined by '+' "
        "from rope, gqa, mqa, swa, mixed",
    )
    p.add_argument("--seeds", type=int, metavar="N", help="seeds per variant (default 2)")
    p.add_argument(
        "--data",
        metavar="DIR",
        help="a prepared data directory (default: the offline stdlib corpus, prepared in OUT/data)",
    )
    p.add_argument("--steps", type=int, metavar="N", help="training steps per run (run.steps)")
    p.add_argument("--out", default="compare", metavar="DIR", help="output directory (default: compare)")
    p.add_argument("--quick", action="store_true", help="a tiny configuration that runs in seconds (a smoke test)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(overrides=[])

    def run(args):
        from gpt2lab.compare_config import load_config
        from gpt2lab.experiments import compare

        cfg = load_config(
            args.config,
            args.overrides,
            quick=args.quick,
            variants=args.variants,
            seeds=args.seeds,
            data=args.data,
            steps=args.steps,
        )
        command = ["gpt2lab compare"]
        for flag in ("config", "variants", "seeds", "data", "steps", "out"):
            if getattr(args, flag) is not None:
                command.append(f"--{flag} {getattr(args, flag)}")
        command += ["--quick"] * args.quick + list(args.overrides)
        results = compare(cfg, args.out, " ".join(command), progress=not args.no_progress)
        print(
            f"compared {len(results['variants'])} variants in {results['runtime_s'] / 60:.1f} min; see {args.out}/report.md"
        )

    p.set_defaults(func=run)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand listed; only ``command``'s own options are built (None: all), since
    some builders import heavy modules for their help text and a run uses one subcommand."""
    parser = argparse.ArgumentParser(
        prog="gpt2lab", description="GPT-2 and its modern variants: load, generate, train, compare, benchmark."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (build, help) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        if command in (None, name):
            build(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    named = next((a for a in argv if not a.startswith("-")), "")  # the subcommand, if any (no top-level options)
    parser = build_parser(named)
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides"):  # only train takes free-form --section.key=value settings
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = extra
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args.func(args)
    except GPT2LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
