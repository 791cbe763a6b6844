"""Parallel residual adapters for CNNs (Rebuffi et al., CVPR 2018).

y = conv(x) + adapter(x), adapter a 1x1 convolution with the conv's stride, zero at start. For an odd
kernel padded by k//2 the 1x1 path reads exactly the kernel's centre tap, so it merges into the centre.
"""
import copy

import torch
from torch import nn

from .tree import conv_nd, spatial_dims


def check_centred(conv: nn.Module) -> None:
    """A parallel 1x1 path lines up with the conv only for odd kernels padded by k//2 (nnU-Net's choice)."""
    ok = (conv.groups == 1 and conv.padding_mode == "zeros"
          and all(d == 1 for d in conv.dilation)
          and all(k % 2 == 1 and p == k // 2 for k, p in zip(conv.kernel_size, conv.padding)))
    if not ok:
        raise ValueError(f"parallel adapters need odd, centre-padded, ungrouped kernels; got {conv}")


class ParallelConvAdapter(nn.Module):
    mergeable = True

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        check_centred(base_layer)
        self.base_layer = base_layer
        self.adapter = conv_nd(spatial_dims(base_layer))(
            base_layer.in_channels, base_layer.out_channels, 1, stride=base_layer.stride, bias=False)
        nn.init.zeros_(self.adapter.weight)
        self.to(device=base_layer.weight.device, dtype=base_layer.weight.dtype)

    def forward(self, x):
        return self.base_layer(x) + self.adapter(x)

    @torch.no_grad()
    def merged(self) -> nn.Module:
        layer = copy.deepcopy(self.base_layer)
        centre = tuple(k // 2 for k in layer.kernel_size)
        layer.weight[(slice(None), slice(None)) + centre] += self.adapter.weight.flatten(2)[..., 0]
        return layer
