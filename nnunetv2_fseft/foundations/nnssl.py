"""nnssl checkpoints (self-supervised encoders published for nnU-Net): read the published layout.

The file is a dict read with torch.load(weights_only=True): `network_weights` (the whole network; the decoder
also holds the encoder as `decoder.encoder.*`, and every conv appears under `.conv` and `.all_modules.0`),
`citations`, and `nnssl_adaptation_plan` (architecture, pre-training preprocessing, which keys are the encoder
and the stem). Only the encoder and the stem are adapted: the decoder was trained to reconstruct images.
The tests and benchmarks write this layout with tests/foundation_files.py's write_checkpoint."""
from pathlib import Path

from ..errors import FSEFTError
from .architectures import check_weights, resolve_architecture
from .description import Foundation, strip_prefix, weights_digest

PLAN_KEY = "nnssl_adaptation_plan"


def stem_keys(architecture: dict) -> tuple:
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
                                 plan.get("key_to_stem") or stem_keys(architecture)[0]) if p)
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
