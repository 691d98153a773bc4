"""FlexAttention for sliding-window layers: when it is chosen, and that its path computes what SDPA does.

The fused kernel runs on CUDA only (bench/gpu_flex_check.py checks it there, with gradients). On CPU
these tests drive the same model code with flex's eager reference implementation, forward only.
"""

from __future__ import annotations

import pytest
import torch

import gpt2lab.model as model_module
from gpt2lab import GPT, Backends
from gpt2lab.config import GPTConfig

flex = pytest.importorskip("torch.nn.attention.flex_attention")

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")


@pytest.mark.parametrize(
    ("device", "overrides", "chosen"),
    [
        (CUDA, {}, True),
        (CPU, {}, False),  # no flex backward on CPU
        (CUDA, {"dropout": 0.1}, False),  # flex has no attention dropout
        (CUDA, {"n_head": 16}, False),  # head_dim 8: below the kernels' minimum
        (CUDA, {"n_embd": 192, "n_head": 4}, False),  # head_dim 48: not a power of two
    ],
)
def test_flex_is_chosen_on_cuda_only(device, overrides, chosen):
    config = GPTConfig(**({"n_layer": 1, "n_head": 2, "n_embd": 128, "window": 4} | overrides))
    assert model_module.flex_applies(device, config) is chosen


def test_cpu_window_layers_keep_the_boolean_mask():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=50, window=3)).eval()
    with torch.no_grad():
        model(torch.zeros(1, 10, dtype=torch.long))
    mask = model._window_masks[(10, CPU)]
    assert mask.dtype == torch.bool and mask.shape == (10, 10)


@pytest.mark.parametrize("T", [5, 200])  # shorter than the window; several 128-token blocks
def test_block_mask_is_the_window(T):
    block_mask = model_module.window_block_mask(T, 7, CPU)
    dense = flex.create_mask(block_mask.mask_mod, None, None, T, T, device=CPU)[0, 0]
    i = torch.arange(T)
    assert torch.equal(dense, (i[None] <= i[:, None]) & (i[None] > i[:, None] - 7))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(
    "overrides",
    [
        {"window": 16},
        {"window": 50, "window_pattern": "LG", "n_kv_head": 2, "pos_emb": "rope"},
        {"window": 8, "n_kv_head": 1},
    ],
)
def test_flex_path_matches_sdpa(overrides):
    config = GPTConfig(**({"n_layer": 2, "n_head": 4, "n_embd": 64, "vocab_size": 100, "block_size": 256} | overrides))
    torch.manual_seed(0)
    reference = GPT(config).eval()
    idx = torch.randint(0, 100, (2, 200))
    with torch.no_grad():
        want, _ = reference(idx)
    # FlexAttention on the CPU runs its eager kernel (forward only): the same masks as on CUDA
    flexed = GPT(config, Backends(attention="flex")).eval()
    flexed.load_state_dict(reference.state_dict())
    with torch.no_grad():
        got, _ = flexed(idx)
    assert isinstance(flexed._window_masks[(200, CPU)], flex.BlockMask)
    torch.testing.assert_close(got, want)
