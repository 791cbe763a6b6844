"""Spatial adapter (black-box): a residual block of 3x3x3 convs on the frozen network's final decoder
features, last conv zero at start, followed by the segmentation head."""
from torch import nn

from .tree import conv_nd, spatial_dims


class SpatialAdapterHead(nn.Module):
    mergeable = False

    def __init__(self, base_layer: nn.Module, negative_slope: float = 0.01):
        super().__init__()
        conv = conv_nd(spatial_dims(base_layer))
        channels = base_layer.in_channels
        self.base_layer = base_layer  # the 1x1 head
        self.adapter = nn.Sequential(
            conv(channels, channels, 3, padding=1),
            nn.LeakyReLU(negative_slope),
            conv(channels, channels, 3, padding=1),
        )
        nn.init.zeros_(self.adapter[-1].weight)
        nn.init.zeros_(self.adapter[-1].bias)
        self.to(device=base_layer.weight.device, dtype=base_layer.weight.dtype)

    def forward(self, x):
        return self.base_layer(x + self.adapter(x))
