"""int8 linear layers for CPU inference.

A decode step at batch 1 reads every weight once per token, so it is bound by memory bandwidth; int8
weights read a quarter of fp32's bytes. The kernels are fbgemm's dynamic quantization (torch.ao):
weights int8 per output channel, activations quantized per tensor on the fly, fp32 accumulation and
output. The embedding table stays fp32 (a lookup reads one row); the tied lm_head gets its own int8 copy.
torch.ao marks these kernels deprecated in favour of torchao, whose CPU int8 kernels are slower on
AVX2-only machines; the logit error is measured in bench/cpu.py and tests/test_quantize.py.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from gpt2lab.errors import GPT2LabError
from gpt2lab.model import GPT
from gpt2lab.ops import Linear


def quantize_int8(model: GPT) -> GPT:
    """An inference copy of ``model`` (fp32, CPU) whose linear layers run in int8."""
    if model.wte.weight.device.type != "cpu" or model.wte.weight.dtype != torch.float32:
        raise GPT2LabError("int8 quantization is for float32 models on the CPU; load with --device cpu --dtype float32")
    if (
        "fbgemm" not in torch.backends.quantized.supported_engines
        and "x86" not in torch.backends.quantized.supported_engines
    ):
        raise GPT2LabError("this PyTorch build has no x86 int8 kernels (fbgemm); run without int8 quantization")
    quantized = copy.deepcopy(model).eval()
    for module in quantized.modules():
        if isinstance(module, Linear):
            module.__class__ = nn.Linear  # torch.ao swaps exact nn.Linear modules only; same parameters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torch.ao deprecation notice, see the module docstring
        torch.ao.quantization.quantize_dynamic(
            quantized,
            {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
            dtype=torch.qint8,
            inplace=True,
        )
    return quantized
