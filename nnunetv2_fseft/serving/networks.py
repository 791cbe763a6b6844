"""Adapter networks that hold the foundation's tensors once, and the stacked network one sliding window runs.

Chosen: one module per adapter (and fold) whose frozen tensors are the same Parameter objects as every other
adapter's, not one network per method whose adapter tensors are swapped in before each adapter runs. Why:
- adapters of different targets have heads of other shapes (another class count), so swapping would still need
  one network per method and head shape, and a copy of tensors per image and adapter;
- the shared-encoder path needs every adapter's decoder at hand at once (the skips of one window feed them all);
- each module is a plain adapted network, built by the same code as `nnUNetv2_fseft_export --apply`, with
  nothing to restore between adapters.
Memory: the foundation's tensors once, plus each adapter's own (its trained tensors, and the frozen head channels
of a method that trains the last head only); `share_frozen_tensors` only shares a tensor that is equal.

`StackedNetwork` puts the adapters' outputs side by side along the channel axis, so nnU-Net's own sliding window
(Gaussian weighting, mirroring, accumulation) runs once for all of them: every operation after the network is
per voxel and channel, so each adapter's channels are what its own run computes."""
import torch
from torch import nn

from ..checkpoints import apply_foundation, load_adapter_tensors
from ..export import rebuild
from ..peft import foundation_key


def build_network(adapter, fold: int, foundation) -> nn.Module:
    """The adapter's network for one fold: the foundation with the method injected and the tensors loaded (as
    nnUNetv2_fseft_export --apply builds it)."""
    folder = adapter.folder / adapter.folds[fold]
    network = rebuild(adapter.plans, adapter.dataset_json, adapter.configs[fold], folder)
    apply_foundation(network, foundation, adapter.dataset_json)
    load_adapter_tensors(network, adapter.tensors[fold], folder)
    for p in network.parameters():
        p.requires_grad_(False)
    return network.eval()


def _frozen_slots(network: nn.Module, trained: set):
    """(module, parameter name, foundation key) of every parameter the adapter did not train."""
    for module_name, module in network.named_modules():
        for name, p in module._parameters.items():
            key = f"{module_name}.{name}" if module_name else name
            if p is None or key in trained:
                continue
            fkey = foundation_key(key)
            if fkey is not None:
                yield module, name, fkey


def share_frozen_tensors(networks: list, trained_keys: list) -> int:
    """Point every frozen parameter at one shared Parameter per foundation key (equal values only). `trained_keys`
    holds each network's adapter-tensor keys. Returns the number of tensors no longer held twice."""
    pool, shared = {}, 0
    for network, trained in zip(networks, trained_keys):
        for module, name, fkey in _frozen_slots(network, set(trained)):
            p = module._parameters[name]
            held = pool.get(fkey)
            if held is None:
                pool[fkey] = p
            elif held is not p and held.shape == p.shape and held.dtype == p.dtype and torch.equal(held, p):
                module._parameters[name] = held
                shared += 1
    return shared


def untouched_encoders(networks: list, trained_keys: list) -> list:
    """Per network: True when its encoder is the foundation's, untouched: no adapter tensor in it (no LoRA, no
    trained bias or stem) and the very same parameter objects as the first such network's encoder."""
    untouched = [not any(k.startswith("encoder.") for k in keys) for keys in trained_keys]
    if any(untouched):
        reference = networks[untouched.index(True)].encoder
        untouched = [u and _same_tensors(n.encoder, reference) for u, n in zip(untouched, networks)]
    return untouched


def _same_tensors(module: nn.Module, reference: nn.Module) -> bool:
    params, ref = list(module.named_parameters()), list(reference.named_parameters())
    return len(params) == len(ref) and all(n == m and p is q for (n, p), (m, q) in zip(params, ref))


def _stage_modules(decoder: nn.Module, s: int) -> nn.ModuleList:
    return nn.ModuleList([decoder.transpconvs[s], decoder.stages[s]])


def trunk_depths(networks: list, trained_keys: list) -> list:
    """Per network: None when it runs whole (its encoder is changed), else k: it shares the foundation's encoder and
    its first k decoder stages (tensor for tensor) with the others that share them, and runs only its stages from
    k on and its head. k = 0 for the decoder method, the number of stages - 1 for FT-last, all of them for the
    linear probe and the spatial adapter (their heads only). Stages are only split off a stock UNetDecoder."""
    from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
    depths = [0 if u else None for u in untouched_encoders(networks, trained_keys)]
    references = {}  # stage -> the first network's modules of that stage that are the foundation's
    for i, (network, keys) in enumerate(zip(networks, trained_keys)):
        decoder = network.decoder
        if depths[i] is None or type(decoder) is not UNetDecoder or decoder.deep_supervision:
            continue
        while depths[i] < len(decoder.stages):
            s = depths[i]
            prefixes = (f"decoder.transpconvs.{s}.", f"decoder.stages.{s}.")
            modules = _stage_modules(decoder, s)
            if any(k.startswith(prefixes) for k in keys) or not _same_tensors(modules,
                                                                             references.setdefault(s, modules)):
                break
            depths[i] += 1
    return depths


def _stage(decoder: nn.Module, s: int, lres: torch.Tensor, skips: list) -> torch.Tensor:
    """Decoder stage s as dynamic-network-architectures' UNetDecoder.forward runs it."""
    x = decoder.transpconvs[s](lres)
    x = torch.cat((x, skips[-(s + 2)]), 1)
    return decoder.stages[s](x)


class StackedNetwork(nn.Module):
    """forward(x): the adapters' logits side by side along the channel axis. `depths` (trunk_depths): the adapters
    with a depth share one run of the foundation's encoder and of its first decoder stages, up to each one's depth;
    from there each runs its own stages and head, as its own decoder's forward would. The others run whole."""

    def __init__(self, networks: list, depths: list):
        super().__init__()
        self.adapters = nn.ModuleList(networks)
        shared = [d is not None for d in depths]
        self.depths = list(depths) if shared.count(True) > 1 else [None] * len(depths)
        self.trunk = networks[shared.index(True)].encoder if shared.count(True) > 1 else None

    def forward(self, x):
        if self.trunk is None:
            return torch.cat([network(x) for network in self.adapters], 1)
        skips = self.trunk(x)
        features = [skips[-1]]  # features[s]: the input of decoder stage s, features[-1] of the head
        for s in range(max(d for d in self.depths if d is not None)):
            owner = next(n for n, d in zip(self.adapters, self.depths) if d is not None and d > s)
            features.append(_stage(owner.decoder, s, features[s], skips))
        outputs = []
        for network, depth in zip(self.adapters, self.depths):
            if depth is None:
                outputs.append(network(x))
            elif depth == 0:
                outputs.append(network.decoder(skips))
            else:
                lres = features[depth]
                for s in range(depth, len(network.decoder.stages)):
                    lres = _stage(network.decoder, s, lres, skips)
                outputs.append(network.decoder.seg_layers[-1](lres))
        return torch.cat(outputs, 1)
