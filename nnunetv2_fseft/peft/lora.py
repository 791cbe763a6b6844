"""LoRA for convolutions and transposed convolutions (Hu et al. 2022, conv form as in HF peft).

y = W x + (alpha / r) * B(A(dropout(x))): A has the base layer's kernel, stride and padding and maps to r
channels; B is a 1x1 conv back to the output channels, zero at start so the network is unchanged.
The product B.A is an ordinary kernel, so merging into W is exact.
"""
import copy
import math

import torch
from torch import nn

from .tree import TRANSPOSED_CONV_TYPES, conv_nd, spatial_dims


class LoRAConv(nn.Module):
    mergeable = True
    # the FSEFT study's setting (scaling alpha / r = 1); the method registry's option defaults are these
    DEFAULTS = {"rank": 4, "alpha": 4, "dropout": 0.0}

    def __init__(self, base_layer: nn.Module, rank: int = DEFAULTS["rank"], alpha: float = DEFAULTS["alpha"],
                 dropout: float = DEFAULTS["dropout"]):
        super().__init__()
        if base_layer.groups != 1:
            raise ValueError("LoRA supports ungrouped convolutions only")
        self.base_layer = base_layer
        self.rank = rank
        self.scaling = alpha / rank
        self.transposed = isinstance(base_layer, TRANSPOSED_CONV_TYPES)
        kw = dict(kernel_size=base_layer.kernel_size, stride=base_layer.stride, padding=base_layer.padding,
                  dilation=base_layer.dilation, bias=False)
        if self.transposed:
            kw["output_padding"] = base_layer.output_padding
        self.lora_A = type(base_layer)(base_layer.in_channels, rank, **kw)
        self.lora_B = conv_nd(spatial_dims(base_layer))(rank, base_layer.out_channels, 1, bias=False)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.to(device=base_layer.weight.device, dtype=base_layer.weight.dtype)

    def forward(self, x):
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        a = self.lora_A.weight.flatten(2)          # conv: (r, in, k); transposed: (in, r, k)
        b = self.lora_B.weight.flatten(1)          # (out, r)
        if self.transposed:
            delta = torch.einsum("irk,or->iok", a, b)
        else:
            delta = torch.einsum("or,rik->oik", b, a)
        return delta.reshape(self.base_layer.weight.shape) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Module:
        layer = copy.deepcopy(self.base_layer)
        layer.weight += self.delta_weight()
        return layer
