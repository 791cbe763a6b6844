"""Where a dynamic-network-architectures U-Net really computes, and how to swap layers there.

The networks keep every conv/norm twice (`block.conv` and `block.all_modules[0]`, and `forward` runs
`all_modules`) and the decoder holds the encoder (`decoder.encoder`). So a layer is never replaced
through one attribute: `replace_module` swaps every reference to the same object.
"""
from torch import nn

# Injected wrappers keep the original layer as `base_layer`; their own parameters live in submodules whose
# names start with one of these prefixes. Foundation keys are recovered from adapted keys by this rule.
BASE_NAME = "base_layer"
ADAPTER_PREFIXES = ("lora_", "adapter")

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONV_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM_TYPES = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> int:
    """Point every attribute that holds `old` (aliases included) at `new`. Returns how many were swapped."""
    swapped = 0
    for parent in list(root.modules()):
        for name, child in parent._modules.items():
            if child is old:
                parent._modules[name] = new
                swapped += 1
    if swapped == 0:
        raise ValueError("module to replace is not part of the network")
    return swapped


def conv_nd(num_dims: int):
    """The plain convolution class for 1D/2D/3D data."""
    return CONV_TYPES[num_dims - 1]


def spatial_dims(conv: nn.Module) -> int:
    return conv.weight.ndim - 2


def head_modules(network: nn.Module) -> list:
    """The 1x1 segmentation layers, one per deep-supervision output, highest resolution last."""
    return list(network.decoder.seg_layers)


def scope_modules(network: nn.Module, scope: str) -> list:
    """Unique modules of 'encoder', 'decoder' (its own layers, without the aliased encoder) or 'all'."""
    encoder = list(network.encoder.modules())
    if scope == "encoder":
        return encoder
    encoder_ids = {id(m) for m in encoder}
    decoder = [m for m in network.decoder.modules() if id(m) not in encoder_ids]
    if scope == "decoder":
        return decoder
    if scope == "all":
        return encoder + decoder
    raise ValueError(f"unknown scope {scope!r}; use 'encoder', 'decoder' or 'all'")


def conv_layers(network: nn.Module, scope: str, transposed: bool) -> list:
    """Convolutions in `scope` that forward really runs, excluding the segmentation heads (trained in full)."""
    skip = {id(m) for h in head_modules(network) for m in h.modules()}
    skip |= {id(m) for w in injected_modules(network) for m in w.modules()}  # never wrap a wrapper's layers
    types = CONV_TYPES + (TRANSPOSED_CONV_TYPES if transposed else ())
    return [m for m in scope_modules(network, scope) if type(m) in types and id(m) not in skip]


def injected_modules(network: nn.Module) -> list:
    """Wrappers added by a PEFT method (unique objects)."""
    return [m for m in network.modules() if hasattr(m, BASE_NAME) and hasattr(m, "mergeable")]


def is_adapter_key(key: str) -> bool:
    return any(part.startswith(ADAPTER_PREFIXES) for part in key.split("."))


def foundation_key(adapted_key: str):
    """State-dict key of the plain network that an adapted key came from; None for injected parameters."""
    if is_adapter_key(adapted_key):
        return None
    return ".".join(p for p in adapted_key.split(".") if p != BASE_NAME)
