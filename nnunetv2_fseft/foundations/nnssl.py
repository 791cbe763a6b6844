"""nnssl checkpoints (self-supervised encoders published for nnU-Net): read and write the published layout.

The file is a dict read with torch.load(weights_only=True): `network_weights` (the whole network; the decoder
also holds the encoder as `decoder.encoder.*`, and every conv appears under `.conv` and `.all_modules.0`),
`citations`, and `nnssl_adaptation_plan` (architecture, pre-training preprocessing, which keys are the encoder
and the stem). Only the encoder and the stem are adapted: the decoder was trained to reconstruct images."""
import os
from pathlib import Path

import torch

from ..errors import FSEFTError
from .architectures import SUPPORTED_CLASSES, check_weights, resolve_architecture
from .description import Foundation, strip_prefix, weights_digest

PLAN_KEY = "nnssl_adaptation_plan"
ENCODER_ALIAS = "decoder."  # dynamic-network-architectures' decoder.encoder is the encoder again


def _stem_keys(architecture: dict) -> tuple:
    """(key_to_stem, keys_to_in_proj) as nnssl names them for this architecture."""
    if architecture["network_class_name"].endswith("PlainConvUNet"):
        stem, first = "encoder.stages.0", "encoder.stages.0.0.convs.0"
    else:
        stem, first = "encoder.stem", "encoder.stem.convs.0"
    return stem, [f"{first}.conv", f"{first}.all_modules.0"]


def read_nnssl(path: Path, checkpoint: dict) -> Foundation:
    plan = checkpoint[PLAN_KEY]
    if not isinstance(plan, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise FSEFTError(f"{path}: an nnssl checkpoint needs 'network_weights' and an '{PLAN_KEY}' dict; "
                         "the file is incomplete: get it again from its source")
    architecture = resolve_architecture(plan.get("architecture_plans"), path)
    all_weights = strip_prefix(checkpoint["network_weights"])
    prefixes = tuple(p for p in (plan.get("key_to_encoder") or "encoder.stages",
                                 plan.get("key_to_stem") or _stem_keys(architecture)[0]) if p)
    weights = {k: v for k, v in all_weights.items() if k.startswith(prefixes)}
    if not weights:
        raise FSEFTError(f"{path}: no weights under {' / '.join(prefixes)} (the plan's key_to_encoder / key_to_stem); "
                         "the checkpoint holds no encoder: get it again from its source")
    channels = int(plan.get("pretrain_num_input_channels") or 1)
    check_weights(architecture, weights, channels, prefixes, path)
    configurations = (plan.get("pretrain_plan") or {}).get("configurations") or {}
    config = next(iter(configurations.values()), {}) if isinstance(configurations, dict) else {}
    preprocessing = {"spacing": config.get("spacing"),
                     "normalization_schemes": config.get("normalization_schemes") or ["ZScoreNormalization"] * channels,
                     "use_mask_for_norm": config.get("use_mask_for_norm") or [False] * channels,
                     "patch_size": config.get("patch_size"),
                     "recommended_patch_size": plan.get("recommended_downstream_patchsize")}
    citations = checkpoint.get("citations") or []
    return Foundation(source="nnssl", path=path, architecture=architecture, weights=weights, parts="encoder",
                      channel_names=None, num_input_channels=channels, dataset_json=None, plans=None,
                      configuration=None, preprocessing=preprocessing,
                      citations=list(citations) if isinstance(citations, (list, tuple)) else [citations],
                      weights_sha256=weights_digest(all_weights))


def write_checkpoint(path, *, network_weights: dict, architecture, spacing, normalization_schemes, patch_size,
                     citations=()) -> Path:
    """Write weights in the published nnssl layout (read back by read_foundation as an encoder-only foundation).

    architecture: "ResEncL" or nnU-Net plans style {network_class_name, arch_kwargs, _kw_requires_import}.
    network_weights: a state dict of the network; the `decoder.encoder.*` aliases are added where missing."""
    from ..checkpoints import atomic_write
    weights = {k: v.detach().cpu().clone() for k, v in strip_prefix(network_weights).items()}
    for key in [k for k in weights if k.startswith("encoder.")]:
        weights.setdefault(ENCODER_ALIAS + key, weights[key])
    if isinstance(architecture, str):
        plans = {"arch_class_name": architecture, "arch_kwargs": None, "arch_kwargs_requiring_import": None}
        resolved = resolve_architecture(plans, path)
    else:
        name = architecture["network_class_name"]
        short = next((s for s, full in SUPPORTED_CLASSES.items() if full == name), name)
        plans = {"arch_class_name": short, "arch_kwargs": dict(architecture["arch_kwargs"]),
                 "arch_kwargs_requiring_import": list(architecture.get("_kw_requires_import") or [])}
        resolved = resolve_architecture(plans, path)
    stem, in_proj = _stem_keys(resolved)
    for a, b in (in_proj, in_proj[::-1]):  # the stem conv under both of its names
        for suffix in (".weight", ".bias"):
            if a + suffix in weights:
                weights.setdefault(b + suffix, weights[a + suffix])
    first = weights.get(in_proj[0] + ".weight")
    if first is None:
        raise FSEFTError(f"network_weights has no '{in_proj[0]}.weight' (the stem conv of "
                         f"{resolved['network_class_name'].split('.')[-1]}); pass the state dict of that network")
    checkpoint = {
        "network_weights": weights,
        "citations": [dict(c) for c in citations],
        PLAN_KEY: {
            "architecture_plans": plans,
            "pretrain_plan": {"configurations": {"pretrain": {
                "spacing": None if spacing is None else [float(s) for s in spacing],
                "spacing_style": "like_pretrained", "normalization_schemes": list(normalization_schemes),
                "use_mask_for_norm": [False] * len(normalization_schemes),
                "patch_size": [int(p) for p in patch_size]}}},
            "pretrain_num_input_channels": int(first.shape[1]),
            "recommended_downstream_patchsize": [int(p) for p in patch_size],
            "key_to_encoder": "encoder.stages", "key_to_stem": stem, "keys_to_in_proj": list(in_proj),
            "key_to_lpe": None,
        },
    }
    path = Path(path)
    if path.exists():
        raise FSEFTError(f"{path} exists; choose another file name or remove it first")
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    return path
