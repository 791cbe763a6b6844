"""What the library knows about a foundation, whatever file it came from."""
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Foundation:
    source: str                   # "nnunet" (model folder / checkpoint_final.pth) | "nnssl" (SSL checkpoint)
    path: Path                    # the file whose weights were read
    architecture: dict            # nnU-Net plans style: network_class_name, arch_kwargs, _kw_requires_import;
                                  #   None for a bare nnU-Net state dict without plans (loadable, not plannable)
    weights: dict                 # state dict on the CPU, no "module." prefix; parts == "encoder": encoder keys only
    parts: str                    # "network" (decoder and heads trained for segmentation) | "encoder" (encoder + stem)
    channel_names: dict           # {"0": "CT", ...} as in dataset.json; None when the source does not name them
    num_input_channels: int
    dataset_json: dict            # the foundation's classes (head mapping); None for nnssl
    plans: dict                   # full nnU-Net plans; None for nnssl
    configuration: str            # the plans configuration it was trained with; None for nnssl
    preprocessing: dict           # spacing, normalization_schemes, use_mask_for_norm, patch_size, recommended_patch_size
    citations: list = field(default_factory=list)
    weights_sha256: str = ""      # digest of the file's network weights (see weights_digest)

    def describe(self) -> str:
        """One line for logs: what was read and which parts it holds."""
        kind = "nnssl checkpoint" if self.source == "nnssl" else "nnU-Net checkpoint"
        parts = "encoder + stem only (decoder and heads start fresh)" if self.parts == "encoder" else "whole network"
        return f"{kind} {self.path}: {parts}, {self.num_input_channels} input channel(s)"


def strip_prefix(weights: dict) -> dict:
    """A state dict without DDP's 'module.' prefix."""
    return {k[7:] if k.startswith("module.") else k: v for k, v in weights.items()}


def weights_digest(weights: dict) -> str:
    """sha256 over the network weights' names, dtypes, shapes and bytes, in order. Unlike the file's sha256 it
    ignores the log and optimizer state, so two runs with bitwise-equal weights share it."""
    h = hashlib.sha256()
    for name, tensor in strip_prefix(weights).items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
