"""MHA -> GQA conversion: exactness, the pooling arithmetic, the grouping convention, files and CLI."""

from __future__ import annotations

import pytest
import torch

from gpt2lab import GPT
from gpt2lab.cli import main
from gpt2lab.config import GPTConfig
from gpt2lab.convert import convert_to_gqa
from gpt2lab.errors import ConfigError
from gpt2lab.load import load_model, save_pretrained
from gpt2lab.train_config import TrainConfig

# Full GPT-2 vocabulary so the CLI's tokenizer ids are all valid; tiny everywhere else.
CONFIG = dict(n_layer=2, n_head=4, n_embd=32, block_size=32)


def tiny(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**(CONFIG | overrides))).eval()
    with torch.no_grad():  # non-zero biases, so their pooling is tested too
        for block in model.h:
            block.attn.c_attn.bias.normal_(std=0.02)
    return model


def tokens() -> torch.Tensor:
    return torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))


def logits(model: GPT) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens())[0]


def test_same_head_count_is_an_exact_copy():
    model = tiny()
    copy = convert_to_gqa(model, 4)
    assert copy.config.n_kv_head == 4
    assert torch.equal(logits(copy), logits(model))
    assert copy.lm_head.weight is copy.wte.weight  # still tied
    assert copy.wte.weight.data_ptr() != model.wte.weight.data_ptr()  # a copy, not an alias


@pytest.mark.parametrize("method", ["mean", "first"])
def test_pooled_weights_are_the_group_means_or_first_heads(method):
    model = tiny()
    gqa = convert_to_gqa(model, 2, method)
    C, hs = 32, 8
    for old, new in zip(model.h, gqa.h, strict=True):
        for name in ("weight", "bias"):
            w_old, w_new = getattr(old.attn.c_attn, name), getattr(new.attn.c_attn, name)
            assert w_new.shape[0] == C + 2 * 2 * hs
            assert torch.equal(w_new[:C], w_old[:C])  # queries untouched
            for part in (0, 1):  # keys, then values
                heads = [w_old[C + part * C + h * hs : C + part * C + (h + 1) * hs] for h in range(4)]
                for g in range(2):  # kv head g pools query heads 2g and 2g + 1 (h // 2)
                    start = C + part * 2 * hs + g * hs
                    want = (heads[2 * g] + heads[2 * g + 1]) / 2 if method == "mean" else heads[2 * g]
                    torch.testing.assert_close(w_new[start : start + hs], want)
        assert torch.equal(new.attn.c_proj.weight, old.attn.c_proj.weight)
        assert torch.equal(new.mlp.c_fc.weight, old.mlp.c_fc.weight)


def test_groups_of_identical_heads_convert_without_loss():
    """If the heads of each group are already equal, pooling loses nothing: this pins the grouping
    convention (query head h uses kv head h // group), which the model's GQA attention must share."""
    model = tiny(n_head=8, n_embd=64)
    hs = 8
    with torch.no_grad():
        for block in model.h:
            for tensor in (block.attn.c_attn.weight, block.attn.c_attn.bias):
                for start in (64, 128):  # keys, values
                    heads = tensor[start : start + 64].view(8, hs, *tensor.shape[1:])
                    heads[1::2] = heads[0::2]  # heads 2g and 2g+1 equal
    gqa = convert_to_gqa(model, 4)
    torch.testing.assert_close(logits(gqa), logits(model))


def test_pooling_in_steps_equals_pooling_at_once():
    model = tiny(n_head=8, n_embd=64)
    stepwise = convert_to_gqa(convert_to_gqa(model, 4), 2)
    direct = convert_to_gqa(model, 2)
    torch.testing.assert_close(logits(stepwise), logits(direct))


def test_rope_and_window_settings_survive():
    model = tiny(pos_emb="rope", window=4, window_pattern="LG")
    mqa = convert_to_gqa(model, 1)
    assert (mqa.config.pos_emb, mqa.config.window, mqa.config.window_pattern) == ("rope", 4, "LG")
    assert mqa.h[0].attn.c_attn.weight.shape == (32 + 2 * 8, 32)
    assert logits(mqa).shape == (2, 16, 50257)


@pytest.mark.parametrize(
    ("overrides", "n_kv_head", "message"),
    [
        ({}, 3, "must divide n_head"),
        ({}, 0, "positive integer"),
        ({"n_kv_head": 2}, 4, "already has 2 key/value heads"),
        ({"n_head": 12, "n_embd": 48, "n_kv_head": 4}, 3, "cannot be pooled evenly"),
    ],
)
def test_bad_targets_are_refused(overrides, n_kv_head, message):
    with pytest.raises(ConfigError, match=message):
        convert_to_gqa(tiny(**overrides), n_kv_head)


def test_converted_directory_loads(tmp_path):
    gqa = convert_to_gqa(tiny(), 2)
    save_pretrained(gqa, tmp_path)
    loaded = load_model(tmp_path).eval()
    assert loaded.config.n_kv_head == 2
    assert torch.equal(logits(loaded), logits(gqa))


def test_cli_converts_and_the_result_runs_everywhere(tmp_path, capsys):
    model = tiny()
    save_pretrained(model, tmp_path / "mha")
    out = tmp_path / "gqa"
    assert main(["convert", "--model", str(tmp_path / "mha"), "--n-kv-head", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 -> 1 key/value heads" in printed
    hint = printed.split("recover quality: ")[1].split()  # the fine-tune it suggests, as train reads it
    assert hint[:2] == ["gpt2lab", "train"] and TrainConfig.load(None, hint[2:]).model.init == str(out)
    loaded = load_model(out).eval()
    torch.testing.assert_close(logits(loaded), logits(convert_to_gqa(model, 1)), rtol=0, atol=0)
    assert main(["predict", "Hello", "--model", str(out), "--device", "cpu", "--top", "2"]) == 0
    assert "rank" in capsys.readouterr().out
    args = ["--model", str(out), "--device", "cpu", "--temperature", "0", "--seed", "0"]
    assert main(["generate", "--prompt", "Hi", "--max-new-tokens", "3", *args]) == 0


def test_cli_converting_to_the_count_a_model_has_says_it_copied(tmp_path, capsys):
    """The same key/value head count is a copy: no '2 -> 2' conversion to recover from by fine-tuning."""
    save_pretrained(tiny(n_kv_head=2), tmp_path / "gqa")
    assert main(["convert", "--model", str(tmp_path / "gqa"), "--n-kv-head", "2", "--out", str(tmp_path / "c")]) == 0
    printed = capsys.readouterr().out
    assert f"has 2 key/value heads already: wrote an unchanged copy to {tmp_path / 'c'}" in printed
    assert "fine-tune" not in printed
    assert torch.equal(logits(load_model(tmp_path / "c").eval()), logits(load_model(tmp_path / "gqa").eval()))


@pytest.mark.parametrize(
    ("n_kv_head", "out", "message"),
    [("3", "gqa", "must divide n_head"), ("4", "gqa", "already has 2"), ("1", "mha", "own directory")],
)
def test_cli_errors_are_one_line(tmp_path, capsys, n_kv_head, out, message):
    save_pretrained(tiny(n_kv_head=2), tmp_path / "mha")
    argv = ["convert", "--model", str(tmp_path / "mha"), "--n-kv-head", n_kv_head, "--out", str(tmp_path / out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "gqa").exists()
