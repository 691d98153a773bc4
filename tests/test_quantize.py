"""int8 CPU inference: close to fp32, usable through generate and the CLI, refused where it cannot work."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gpt2lab import GPT2LabError, generate, kernels, ops
from gpt2lab.cli import main
from gpt2lab.quantize import Int8Linear, quantize_int8


def test_int8_logits_close_to_fp32(make_gpt):
    """Every linear layer (lm_head included) becomes int8; logits stay close to fp32's (relative to their spread),
    and the original model is left untouched."""
    model = make_gpt(std=0.05, n_layer=2, n_embd=128, n_head=4).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_int8(model)
    assert all(isinstance(m, Int8Linear) for m in (q.lm_head, q.h[0].attn.c_attn, q.h[1].mlp.c_proj))
    assert not any(isinstance(m, ops.Linear) for m in q.modules())
    x = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, _ = model(x)
        got, _ = q(x)
    # measured on this model: mean 0.018, max 0.096 of the logit std, the same top-1 token at 96% of positions
    # (8-bit weights per output channel, 8-bit inputs per token)
    mean_err, max_err = (got - ref).abs().mean() / ref.std(), (got - ref).abs().max() / ref.std()
    assert 0 < mean_err < 0.03 and max_err < 0.15, f"int8 logit error: mean {mean_err:.3f}, max {max_err:.3f} of std"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    with torch.no_grad():  # the loss (gpt2lab eval --int8) goes through the int8 lm_head too
        assert abs(q(x, x)[1] - model(x, x)[1]) < 0.02
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_kernels_agree_with_the_float_product(rows):
    """Each int8 kernel that may run a product of this many rows is within 8-bit rounding of the float32
    product, bias included; the weight's int8 copy reproduces it within half a step per element."""
    g = torch.Generator().manual_seed(rows)
    w, b, x = torch.randn(300, 200, generator=g), torch.randn(300, generator=g), torch.randn(rows, 200, generator=g)
    qweight, scale = ops.quantize_weight(w)
    assert qweight.dtype == torch.int8 and (qweight.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6
    ref = F.linear(x, w, b)
    for kernel in ops.int8_kernels(rows):
        y = ops.int8_linear(x, ops.pack_int8(qweight, scale, b, kernel), kernel, reduce_range=False)
        assert (y - ref).abs().max() < 0.03 * ref.abs().max(), kernel
    assert ops.int8_kernels(5) == ("int_mm",)  # fbgemm quantizes a whole input with one scale: one row only


def test_int8_kernel_is_measured_per_row_count(tmp_path):
    table = kernels.KernelTable(tmp_path / "k.json")
    assert table.choose(1024, 512, 1, kind="int8") in ops.int8_kernels(1)
    assert table.choose(1024, 512, 8, kind="int8") == "int_mm"


def test_int8_generation_matches_its_own_full_forward(make_gpt):
    """The KV-cache path of the int8 model agrees with its full forward (greedy tokens are the argmaxes)."""
    q = quantize_int8(make_gpt(std=0.05).eval())
    prompt = [5, 9, 2, 7]
    [new] = generate(q, [prompt], 8, temperature=0, eos_id=None)
    seq = torch.tensor([prompt + new])
    with torch.no_grad():
        logits, _ = q(seq)
    assert logits[0, len(prompt) - 1 : -1].argmax(-1).tolist() == new


def test_int8_refuses_non_fp32(make_gpt):
    with pytest.raises(GPT2LabError, match="float32"):
        quantize_int8(make_gpt().to(torch.bfloat16))


def test_cli_int8(tiny_dir, capsys):
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_dir),
                "--prompt",
                "Hello",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
                "--device",
                "cpu",
                "--int8",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("Hello")
    assert main(["predict", "--model", str(tiny_dir), "--device", "cpu", "--dtype", "bfloat16", "--int8", "Hi"]) == 2
    assert "float32" in capsys.readouterr().err
