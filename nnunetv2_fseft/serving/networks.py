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
from ..export import _rebuild
from ..peft import foundation_key


def build_network(adapter, fold: int, foundation) -> nn.Module:
    """The adapter's network for one fold: the foundation with the method injected and the tensors loaded (as
    nnUNetv2_fseft_export --apply builds it)."""
    folder = adapter.folder / adapter.folds[fold]
    network = _rebuild(adapter.plans, adapter.dataset_json, adapter.configs[fold], folder)
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
    if not any(untouched):
        return untouched
    reference = list(networks[untouched.index(True)].encoder.named_parameters())
    for i, network in enumerate(networks):
        params = list(network.encoder.named_parameters())
        if untouched[i] and (len(params) != len(reference) or
                             any(n != m or p is not q for (n, p), (m, q) in zip(params, reference))):
            untouched[i] = False
    return untouched


class StackedNetwork(nn.Module):
    """forward(x): the adapters' logits side by side along the channel axis. The encoder of the adapters marked in
    `shared` (untouched encoders, all the same tensors) runs once, and each of them runs only its decoder (stages
    and heads) on those skips; the other adapters run whole."""

    def __init__(self, networks: list, shared: list):
        super().__init__()
        self.adapters = nn.ModuleList(networks)
        self.shared = list(shared)
        self.encoder = networks[self.shared.index(True)].encoder if self.shared.count(True) > 1 else None

    def forward(self, x):
        skips = self.encoder(x) if self.encoder is not None else None
        return torch.cat([network.decoder(skips) if skips is not None and shared else network(x)
                          for network, shared in zip(self.adapters, self.shared)], 1)
