"""The FSEFT methods as declarations: what is injected where, what trains, whether deep supervision applies.

`apply_peft(network, method, options)` is the one entry point; it changes the network in place and leaves
only the method's parameters trainable. `merge_peft` folds mergeable wrappers back into plain layers.
"""
from dataclasses import dataclass, field

from torch import nn

from .adaptformer import BottleneckAdapter
from .conv_adapter import ParallelConvAdapter
from .lora import LoRAConv
from .selective import select
from .spatial_adapter import SpatialAdapterHead
from .tree import conv_layers, head_modules, injected_modules, replace_module

# injection kind -> (wrapper class, includes transposed convs, option keys it accepts)
INJECTIONS = {
    "lora": (LoRAConv, True, tuple(LoRAConv.DEFAULTS)),
    "conv_adapter": (ParallelConvAdapter, False, ()),
    "adaptformer": (BottleneckAdapter, False, tuple(BottleneckAdapter.DEFAULTS)),
}


@dataclass(frozen=True)
class Method:
    train: tuple                      # parameter selectors (see selective.select)
    inject: tuple = ()                # (injection kind, scope) pairs; scope 'head' = the final head
    deep_supervision: bool = True     # only when every head is trained
    description: str = ""
    defaults: dict = field(default_factory=dict)

    @property
    def needs_trained_decoder(self) -> bool:
        """The method keeps (part of) the decoder frozen, so it needs a decoder trained for segmentation: an
        encoder-only foundation (nnssl) has none. Declared by `train`: neither 'all' nor 'decoder' in it."""
        return not {"all", "decoder"} & set(self.train)


METHODS = {
    "full": Method(("all",), description="all parameters"),
    "ft_last": Method(("last_stage", "last_head"), deep_supervision=False,
                      description="last decoder stage + head"),
    "decoder": Method(("decoder",), description="decoder (encoder frozen)"),
    "linear_probe": Method(("last_head",), deep_supervision=False,
                           description="new 1x1 head on the frozen network's final features"),
    "spatial_adapter": Method(("last_head",), inject=(("spatial_adapter", "head"),), deep_supervision=False,
                              description="residual 3x3 conv block + head on the frozen final features"),
    "bitfit": Method(("bias:all", "heads"), description="biases + heads"),
    "affine_norm": Method(("norm:all", "heads"), description="norm weights and biases + heads"),
    "cnn_adapter": Method(("injected", "heads"), inject=(("conv_adapter", "all"),),
                          description="parallel 1x1 adapter per conv + heads"),
    "adaptformer": Method(("injected", "heads"), inject=(("adaptformer", "all"),),
                          description="bottleneck adapter per conv + heads", defaults=dict(BottleneckAdapter.DEFAULTS)),
    "lora": Method(("injected", "heads"), inject=(("lora", "all"),),
                   description="LoRA on every conv and transposed conv + heads",
                   defaults=dict(LoRAConv.DEFAULTS)),
    "decoder_lora": Method(("decoder", "injected"), inject=(("lora", "encoder"),),
                           description="decoder + LoRA on the encoder", defaults=dict(LoRAConv.DEFAULTS)),
    "decoder_bitfit": Method(("decoder", "bias:encoder"), description="decoder + encoder biases"),
    "decoder_adaptformer": Method(("decoder", "injected"), inject=(("adaptformer", "encoder"),),
                                  description="decoder + bottleneck adapters on the encoder",
                                  defaults=dict(BottleneckAdapter.DEFAULTS)),
    "decoder_affine_norm": Method(("decoder", "norm:encoder"), description="decoder + encoder norm affines"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise KeyError(f"unknown PEFT method {name!r}; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def resolved_options(method: str, options: dict = None) -> dict:
    """The method's defaults updated by the caller's options (unknown keys are refused)."""
    spec = get_method(method)
    merged = dict(spec.defaults, **(options or {}))
    unknown = set(merged) - set(spec.defaults)
    if unknown:
        raise KeyError(f"method {method!r} takes no option(s) {sorted(unknown)}; it takes {sorted(spec.defaults)}")
    return merged


def _inject(network: nn.Module, kind: str, scope: str, options: dict) -> None:
    if kind == "spatial_adapter":
        head = head_modules(network)[-1]
        replace_module(network, head, SpatialAdapterHead(head))
        return
    wrapper, transposed, keys = INJECTIONS[kind]
    kwargs = {k: v for k, v in options.items() if k in keys}
    for layer in conv_layers(network, scope, transposed):
        replace_module(network, layer, wrapper(layer, **kwargs))


def apply_peft(network: nn.Module, method: str, options: dict = None) -> nn.Module:
    """Inject the method's layers and freeze everything it does not train. Changes `network` in place."""
    spec = get_method(method)
    options = resolved_options(method, options)
    for kind, scope in spec.inject:
        _inject(network, kind, scope, options)
    for p in network.parameters():
        p.requires_grad_(False)
    for selector in spec.train:
        for p in select(network, selector):
            p.requires_grad_(True)
    return network


def is_mergeable(network: nn.Module) -> bool:
    return all(m.mergeable for m in injected_modules(network))


def merge_peft(network: nn.Module) -> nn.Module:
    """Fold every wrapper into a plain layer, giving a stock network with identical outputs."""
    blocking = sorted({type(m).__name__ for m in injected_modules(network) if not m.mergeable})
    if blocking:
        raise ValueError(f"{', '.join(blocking)} cannot be merged into plain layers (they are nonlinear)")
    for wrapper in injected_modules(network):
        replace_module(network, wrapper, wrapper.merged())
    for p in network.parameters():
        p.requires_grad_(True)
    return network


def count_parameters(network: nn.Module) -> tuple:
    """(trainable, total) over unique parameter tensors (aliases counted once)."""
    params = list(network.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def trainable_state(network: nn.Module) -> dict:
    """The trained tensors only, under one canonical key each: what an adapter file holds."""
    seen, out = set(), {}
    for name, p in network.named_parameters():  # named_parameters yields each tensor once
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out[name] = p.detach()
    return out
