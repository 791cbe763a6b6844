"""AdaptFormer-style bottleneck adapters (Chen et al., NeurIPS 2022) carried over to CNNs.

y = conv(x) + s * up(relu(down(x))): down and up are 1x1 convolutions (down takes the conv's stride),
up starts at zero. The nonlinearity means it cannot be merged into the conv.
"""
from torch import nn

from .conv_adapter import check_centred
from .tree import conv_nd, spatial_dims


class BottleneckAdapter(nn.Module):
    mergeable = False
    # hidden channels = out_channels // reduction; the method registry's option defaults are these
    DEFAULTS = {"reduction": 4, "scale": 0.1}

    def __init__(self, base_layer: nn.Module, reduction: int = DEFAULTS["reduction"], scale: float = DEFAULTS["scale"]):
        super().__init__()
        check_centred(base_layer)
        conv = conv_nd(spatial_dims(base_layer))
        hidden = max(1, base_layer.out_channels // reduction)
        self.base_layer = base_layer
        self.scale = scale
        self.adapter_down = conv(base_layer.in_channels, hidden, 1, stride=base_layer.stride)
        self.adapter_act = nn.ReLU(inplace=True)
        self.adapter_up = conv(hidden, base_layer.out_channels, 1)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)
        self.to(device=base_layer.weight.device, dtype=base_layer.weight.dtype)

    def forward(self, x):
        return self.base_layer(x) + self.scale * self.adapter_up(self.adapter_act(self.adapter_down(x)))
