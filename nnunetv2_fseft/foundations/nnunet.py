"""nnU-Net v2 foundations: a model folder (plans.json, dataset.json, fold_X/checkpoint_final.pth) or one of its
checkpoints. The network is rebuilt from the plans alone, so the trainer class a checkpoint names need not be
importable here."""
from pathlib import Path

from ..errors import FSEFTError
from ..files import read_json
from .description import Foundation, strip_prefix, weights_digest


def folder_checkpoint(folder: Path) -> Path:
    """fold_0's checkpoint_final.pth, else the first fold that has one."""
    found = sorted(folder.glob("fold_*/checkpoint_final.pth"), key=lambda p: (p.parent.name != "fold_0", p.parent.name))
    if not found:
        raise FSEFTError(f"{folder} has no fold_X/checkpoint_final.pth; train the foundation first, or pass its "
                         "checkpoint (.pth) directly")
    return found[0]


def read_model_json(path: Path) -> dict:
    """A model folder's plans.json / dataset.json, or one line naming the broken file."""
    data = read_json(path, "fix: copy the model folder again from its source")
    if not isinstance(data, dict):
        raise FSEFTError(f"{path} is not a JSON object; fix: copy the model folder again from its source")
    return data


def read_nnunet(path: Path, checkpoint: dict, folder: Path = None) -> Foundation:
    """`checkpoint` was read from `path`; plans and dataset.json come from `folder` when given, else init_args."""
    init_args = checkpoint.get("init_args") or {}
    if folder is not None:
        plans, dataset_json = read_model_json(folder / "plans.json"), read_model_json(folder / "dataset.json")
    else:
        plans, dataset_json = init_args.get("plans"), init_args.get("dataset_json")
    weights = strip_prefix(checkpoint["network_weights"])
    dataset_json = dataset_json if isinstance(dataset_json, dict) else None
    channel_names = dict((dataset_json or {}).get("channel_names") or (dataset_json or {}).get("modality") or {})
    description = Foundation(source="nnunet", path=path, architecture=None, weights=weights, parts="network",
                             channel_names=channel_names or None,
                             num_input_channels=len(channel_names) or _stem_channels(weights),
                             dataset_json=dataset_json, plans=None, configuration=None, preprocessing={},
                             citations=[], weights_sha256=weights_digest(weights))
    if not isinstance(plans, dict):  # bare weights: loadable into a network built elsewhere, but not plannable
        return description
    configuration = init_args.get("configuration") or (folder.name.split("__")[-1] if folder else None)
    if configuration not in plans.get("configurations", {}):
        raise FSEFTError(f"{path}: configuration {configuration!r} is not in its plans; pass the model folder "
                         "nnUNetv2_train wrote (TRAINER__PLANS__CONFIG)")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    config = PlansManager(plans).get_configuration(configuration)
    description.architecture = {"network_class_name": config.network_arch_class_name,
                                "arch_kwargs": dict(config.network_arch_init_kwargs),
                                "_kw_requires_import": list(config.network_arch_init_kwargs_req_import)}
    description.preprocessing = {"spacing": list(config.spacing),
                                 "normalization_schemes": list(config.normalization_schemes),
                                 "use_mask_for_norm": list(config.use_mask_for_norm),
                                 "patch_size": list(config.patch_size), "recommended_patch_size": None}
    description.plans, description.configuration = plans, configuration
    return description


def _stem_channels(weights: dict) -> int:
    """Input channels of the first convolution's weight (the network's input), 0 if there is none."""
    first = next((v for k, v in weights.items() if k.startswith("encoder.") and v.ndim > 2), None)
    return int(first.shape[1]) if first is not None else 0
