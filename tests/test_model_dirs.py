"""What a model directory carries besides its weights: its own tokenizer through export, no stale files
of another model, no int8 weights; and which files the hub download fetches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt2lab import generate, load_tokenizer
from gpt2lab.cli import main
from gpt2lab.data import write_token_dir
from gpt2lab.errors import CheckpointError
from gpt2lab.load import load_for_inference, resolve, save_pretrained
from gpt2lab.quantize import quantize_int8
from gpt2lab.tokenizer import EOT, CompactTokenizer, bundled_files

pytestmark = pytest.mark.usefixtures("one_thread")

MERGES = 300  # the custom BPE's merges: its ids are 0..555, <|endoftext|> 556
TEXT = "Hello world, the dog ran home."


def _custom_bpe(directory: Path) -> None:
    """vocab.json + merges.txt of a BPE with GPT-2's first MERGES merges only."""
    encoder_json, vocab_bpe = bundled_files()
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    vocab = {t: i for t, i in encoder.items() if i < 256 + MERGES} | {"<|endoftext|>": 256 + MERGES}
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text("\n".join(lines[: 1 + MERGES]) + "\n", encoding="utf-8")


@pytest.fixture
def custom_dir(make_gpt, tmp_path) -> Path:
    """A plain GPT-2 of 557 tokens whose directory brings its own BPE."""
    directory = tmp_path / "custom"
    save_pretrained(make_gpt(vocab_size=257 + MERGES), directory)
    _custom_bpe(directory)
    return directory


@pytest.mark.parametrize("command", ["export", "convert"])
def test_export_and_convert_keep_the_models_own_tokenizer(command, custom_dir, tmp_path):
    """The written directory holds the source's vocab.json and merges.txt byte for byte (not GPT-2's), and
    its config.json names the tokenizer's own end of text."""
    out = tmp_path / "out"
    extra = ["--n-kv-head", "2"] if command == "convert" else []
    assert main([command, "--model", str(custom_dir), "--out", str(out), *extra]) == 0
    for name in ("vocab.json", "merges.txt"):
        assert (out / name).read_bytes() == (custom_dir / name).read_bytes()
    source, written = load_tokenizer(custom_dir), load_tokenizer(out)
    assert written.n_vocab == source.n_vocab == 257 + MERGES
    assert written.encode(TEXT) == source.encode(TEXT) != load_tokenizer().encode(TEXT)
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 256 + MERGES


def test_a_compact_vocabularys_config_names_its_end_of_text(make_gpt, tmp_path):
    tok = CompactTokenizer(list(range(1000, 1100)) + [EOT])
    save_pretrained(make_gpt(vocab_size=tok.n_vocab), tmp_path, tok)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == tok.eot_token == 356


def test_a_model_saved_over_another_leaves_no_tokenizer_of_the_other_kind(make_gpt, tmp_path):
    """Saving a GPT-2-vocabulary model where a compact one was removes vocabulary.json (which would win on
    loading), and the other way round removes vocab.json and merges.txt (which transformers would read)."""
    compact = CompactTokenizer(list(range(1000, 1100)) + [EOT])
    save_pretrained(make_gpt(vocab_size=compact.n_vocab), tmp_path, compact)
    save_pretrained(make_gpt(vocab_size=50257), tmp_path)
    assert not (tmp_path / "vocabulary.json").exists()
    assert load_tokenizer(tmp_path).n_vocab == 50257
    save_pretrained(make_gpt(vocab_size=compact.n_vocab), tmp_path, compact)
    assert not (tmp_path / "vocab.json").exists() and not (tmp_path / "merges.txt").exists()
    assert isinstance(load_tokenizer(tmp_path), CompactTokenizer)


def test_a_model_saved_over_one_transformers_wrote_leaves_none_of_its_tokenizer_or_generation_files(make_gpt, tmp_path):
    """transformers reads tokenizer.json before vocab.json and merges.txt, and generate() its end of text
    from generation_config.json: a replaced model's would go with the new one's weights."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=32)).save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        (tmp_path / name).write_text("{}")  # what a tokenizer of the replaced model left
    compact = CompactTokenizer(list(range(1000, 1100)) + [EOT])
    save_pretrained(make_gpt(vocab_size=compact.n_vocab), tmp_path, compact)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "vocabulary.json"]
    save_pretrained(make_gpt(vocab_size=50257), tmp_path)
    assert GPT2TokenizerFast.from_pretrained(tmp_path).encode("Hello world") == [15496, 995]


def test_a_tokenizer_without_its_files_is_refused(make_gpt, tmp_path):
    import tiktoken

    stranger = tiktoken.Encoding(
        "mine", pat_str=r"\S+", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}
    )
    with pytest.raises(CheckpointError, match="cannot write the files of tokenizer 'mine'"):
        save_pretrained(make_gpt(vocab_size=256), tmp_path / "out", stranger)


def test_an_int8_model_is_not_saved(make_gpt, tmp_path):
    """Its layers hold int8 weights and scales that no GPT-2 format holds: refused, nothing written."""
    with pytest.raises(CheckpointError, match="int8 model cannot be saved"):
        save_pretrained(quantize_int8(make_gpt()), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_ids_past_the_tokenizer_are_never_predicted(make_gpt, prefer_tokens, tmp_path, capsys):
    """A model whose embeddings were resized for a token the tokenizer lacks (50258 rows, GPT-2's 50257
    ids) loads for inference predicting GPT-2's ids only, even where the extra row scores highest."""
    model = prefer_tokens(make_gpt(vocab_size=50258, block_size=32), 50257)
    save_pretrained(model, tmp_path)
    assert generate(model, [[1, 2]], 2, temperature=0, eos_id=None) == [[50257, 50257]]
    loaded, tok = load_for_inference(tmp_path, device="cpu")
    assert loaded.config.vocab_size == tok.n_vocab == 50257
    assert max(generate(loaded, [[1, 2]], 4, temperature=0, eos_id=None)[0]) < 50257
    assert main(["predict", "Hello", "--model", str(tmp_path), "--device", "cpu"]) == 0
    assert (
        main(["generate", "--prompt", "Hi", "--max-new-tokens", "3", "--model", str(tmp_path), "--device", "cpu"]) == 0
    )
    assert "Traceback" not in capsys.readouterr().err


def _fake_hub(monkeypatch, tmp_path: Path, cached: list[str], remote: list[str]) -> list[list[str]]:
    """snapshot_download over a cache holding ``cached`` and a hub repo holding ``remote``; returns the
    allow_patterns of each download asked for."""
    import fnmatch

    import huggingface_hub

    snapshot, downloads = tmp_path / "snapshot", []
    snapshot.mkdir(parents=True)
    for name in cached:
        (snapshot / name).write_text("{}")

    def snapshot_download(repo, allow_patterns, local_files_only=False):
        if not local_files_only:
            downloads.append(allow_patterns)
            for name in remote:
                if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                    (snapshot / name).write_text("{}")
        elif not cached:
            raise FileNotFoundError("not cached")
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return downloads


def test_a_cache_without_the_weights_downloads_them(monkeypatch, tmp_path):
    """transformers' tokenizer alone caches config.json: the weights are then downloaded, not reported
    missing; offline that is a clear error."""
    downloads = _fake_hub(
        monkeypatch, tmp_path, cached=["config.json", "vocab.json"], remote=["config.json", "model.safetensors"]
    )
    assert (resolve("gpt2") / "model.safetensors").is_file()
    assert len(downloads) == 1
    _fake_hub(monkeypatch, tmp_path / "offline", cached=["config.json"], remote=[])
    with pytest.raises(CheckpointError, match="in the local Hugging Face cache without its weights"):
        resolve("gpt2", offline=True)


def test_a_repo_with_only_pytorch_model_bin_downloads_it(monkeypatch, tmp_path):
    """safetensors are fetched where the repo has them (never both formats); pytorch_model.bin otherwise."""
    downloads = _fake_hub(monkeypatch, tmp_path, cached=[], remote=["config.json", "pytorch_model.bin"])
    assert (resolve("someone/old-gpt2") / "pytorch_model.bin").is_file()
    assert [("pytorch_model.bin" in p) for p in downloads] == [False, True]
    downloads = _fake_hub(monkeypatch, tmp_path / "both", cached=[], remote=["model.safetensors", "pytorch_model.bin"])
    resolve("gpt2")
    assert len(downloads) == 1 and not (tmp_path / "both" / "snapshot" / "pytorch_model.bin").exists()


def test_a_missing_path_that_looks_like_a_repo_id_says_both(monkeypatch, tmp_path):
    """`--model runs/typo` is a repo id in form too: the error says that no such directory exists as well
    as that the hub has no such model."""
    import huggingface_hub

    def unreachable(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"^there is no directory runs/typo, and model 'runs/typo' is not in"):
        resolve("runs/typo")
    with pytest.raises(CheckpointError, match=r"^model 'openai-community/gpt2' is not in"):
        resolve("gpt2")


def test_load_model_checks_its_device_and_save_pretrained_its_tokenizer(tiny_dir, tmp_path):
    """The library checks what the CLI checks: a device this build cannot use (or meta, which would drop
    the weights) and a tokenizer that is not one (a name) are clear errors."""
    from gpt2lab import load_model
    from gpt2lab.errors import ConfigError

    for device in ("meta", "gpu"):
        with pytest.raises(ConfigError, match=f"device '{device}'"):
            load_model(tiny_dir, device=device)
    assert load_model(tiny_dir, device="auto").wte.weight.device.type in ("cpu", "cuda")
    with pytest.raises(CheckpointError, match="cannot write the files of tokenizer 'gpt2'"):
        save_pretrained(load_model(tiny_dir), tmp_path / "out", tokenizer="gpt2")


def test_a_training_runs_directory_is_never_written_over(make_gpt, tmp_path):
    """save_pretrained into a run's out_dir would replace its vocabulary.json, which its checkpoints and
    resuming read: refused, nothing touched."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text("{}")
    (run / "vocabulary.json").write_text('{"kind": "gpt2-bytes", "kept_gpt2_ids": [50256]}')
    with pytest.raises(CheckpointError, match="training run's directory"):
        save_pretrained(make_gpt(), run)
    assert sorted(p.name for p in run.iterdir()) == ["train_config.json", "vocabulary.json"]


def test_a_prepared_data_directory_is_never_written_into(make_gpt, tmp_path):
    """`export --out` naming the data by mistake would mix a model into the token shards: refused,
    nothing touched."""
    data = write_token_dir(tmp_path / "data", {"train": np.arange(100), "val": np.arange(50)}, 256)
    before = sorted(p.name for p in data.iterdir())
    with pytest.raises(CheckpointError, match="is a prepared data directory"):
        save_pretrained(make_gpt(), data)
    assert sorted(p.name for p in data.iterdir()) == before
