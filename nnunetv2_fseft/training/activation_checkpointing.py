"""Activation checkpointing of the U-Net's encoder and decoder stages: in training, a stage keeps only its input
for the backward pass and recomputes its convolutions, norms and (LoRA/adapter) branches there. This trades
about one extra forward for the activation memory of methods whose gradients run through the whole network
(full FT, LoRA, CNN adapters). Forward results and gradients are unchanged; inference (no_grad) is untouched.
Measured in benchmarks/cost.py ("checkpointed" rows)."""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _stages(network: nn.Module) -> list:
    stages = []
    for part in ("encoder", "decoder"):
        stages += list(getattr(getattr(network, part, None), "stages", []))
    return stages


def enable_activation_checkpointing(network: nn.Module) -> int:
    """Checkpoint every encoder and decoder stage of a dynamic_network_architectures U-Net, in place (the
    module tree and state_dict keys stay as they are). Returns the number of stages."""
    stages = _stages(network)
    if not stages:
        raise ValueError(f"{type(network).__name__} has no encoder/decoder stages to checkpoint")
    for stage in stages:
        if getattr(stage, "_fseft_checkpointed", False):
            continue
        forward = stage.forward

        def checkpointed(x, _forward=forward):
            if torch.is_grad_enabled():
                return checkpoint(_forward, x, use_reentrant=False)
            return _forward(x)

        stage.forward = checkpointed  # an instance attribute: nn.Module.__call__ uses it
        stage._fseft_checkpointed = True
    return len(stages)
