"""Which existing parameters a method trains (full, decoder, last stage, heads, BitFit, affine-norm)."""
from torch import nn

from .tree import NORM_TYPES, head_modules, is_adapter_key, scope_modules


def _params(modules) -> list:
    seen, out = set(), []
    for m in modules:
        for p in m.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def select(network: nn.Module, selector: str) -> list:
    """Parameters named by a selector: 'all', 'decoder', 'heads', 'last_head', 'last_stage', 'injected',
    'bias:<scope>' or 'norm:<scope>' (scope: encoder, decoder, all)."""
    if selector == "all":
        return list(network.parameters())
    if selector == "decoder":
        return _params(scope_modules(network, "decoder"))
    if selector == "heads":
        return _params(m for h in head_modules(network) for m in h.modules())
    if selector == "last_head":
        return _params(head_modules(network)[-1].modules())
    if selector == "last_stage":
        d = network.decoder
        return _params(list(d.transpconvs[-1].modules()) + list(d.stages[-1].modules()))
    if selector == "injected":
        return [p for k, p in network.named_parameters() if is_adapter_key(k)]
    kind, _, scope = selector.partition(":")
    modules = scope_modules(network, scope)
    if kind == "bias":
        return [m.bias for m in modules if isinstance(getattr(m, "bias", None), nn.Parameter)]
    if kind == "norm":
        return _params(m for m in modules if isinstance(m, NORM_TYPES))
    raise ValueError(f"unknown parameter selector {selector!r}")
