"""Plan presets and "prepare a target like the foundation", on top of nnU-Net's own planning API.

Nothing here re-implements planning or preprocessing: nnU-Net plans, we adjust a few documented fields
of its plans, and nnU-Net preprocesses.
"""
import contextlib
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from .errors import FSEFTError


def available_presets() -> dict:
    folder = resources.files("nnunetv2_fseft_plans")
    return {p.name[:-5]: p for p in folder.iterdir() if p.name.endswith(".json")}


def load_preset(name: str) -> dict:
    presets = available_presets()
    if name not in presets:
        raise FSEFTError(f"unknown plan preset {name!r}; available presets: {', '.join(sorted(presets))}")
    return json.loads(presets[name].read_text())


def apply_preset(plans: dict, preset: dict) -> dict:
    """Adjust the planned configurations as the preset says; every other field stays nnU-Net's.

    features_per_stage / batch_size: all configurations. patch_size / normalization: 3d_fullres, whose
    topology (stages, strides, kernels) is then re-derived for that patch by nnU-Net's own
    get_pool_and_conv_props, as its planner does. spacing is applied earlier, by nnU-Net's planner."""
    for name, config in plans["configurations"].items():
        if "architecture" not in config:  # inherits_from another configuration
            continue
        kwargs = config["architecture"]["arch_kwargs"]
        if name == "3d_fullres" and "patch_size" in preset:
            _fix_patch(config, preset["patch_size"])
        if name == "3d_fullres" and "normalization" in preset:
            config["normalization_schemes"] = [preset["normalization"]] * len(config["normalization_schemes"])
            config["use_mask_for_norm"] = [False] * len(config["use_mask_for_norm"])
        if "features_per_stage" in preset:
            base, cap = preset["features_per_stage"]["base"], preset["features_per_stage"]["max"]
            kwargs["features_per_stage"] = [min(base * 2 ** i, cap) for i in range(kwargs["n_stages"])]
        if "batch_size" in preset:
            config["batch_size"] = preset["batch_size"]
    return plans


def _fix_patch(config: dict, patch_size) -> None:
    """A fixed patch, with the topology nnU-Net's planner would choose for it at this spacing."""
    from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
    kwargs = config["architecture"]["arch_kwargs"]
    _, strides, kernels, patch, _ = get_pool_and_conv_props(config["spacing"], list(patch_size), 4, 999999)
    n = len(strides)
    blocks, blocks_decoder = kwargs["n_conv_per_stage"][0], kwargs["n_conv_per_stage_decoder"][0]
    old_features = kwargs["features_per_stage"]
    kwargs.update(n_stages=n, strides=[list(s) for s in strides], kernel_sizes=[list(k) for k in kernels],
                  n_conv_per_stage=[blocks] * n, n_conv_per_stage_decoder=[blocks_decoder] * (n - 1),
                  features_per_stage=[min(old_features[0] * 2 ** i, max(old_features)) for i in range(n)])
    config["patch_size"] = [int(p) for p in patch]


def _dataset_name(dataset) -> str:
    """nnU-Net's dataset name, with its raw data checked the way nnU-Net's planning would (one clear line)."""
    from nnunetv2_fseft.data.nnunet_raw import check_raw_dataset, resolve_dataset
    folder = resolve_dataset(dataset)
    check_raw_dataset(folder)
    return folder.name


@contextlib.contextmanager
def _nnunet_step(what: str, name: str):
    """nnU-Net's own checks raise AssertionError/RuntimeError with multi-line text: keep its first line."""
    try:
        yield
    except (AssertionError, RuntimeError, ValueError) as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise FSEFTError(f"nnU-Net's {what} of {name} failed: {first[:300]}; fix the dataset as it says "
                         "(nnUNetv2_plan_and_preprocess -d ID --verify_dataset_integrity shows the details)") from None


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FSEFTError(f"{path} is not valid JSON ({e}); fix: copy the model folder again from its source") from None
    if not isinstance(data, dict):
        raise FSEFTError(f"{path} is not a JSON object; fix: copy the model folder again from its source")
    return data


def _require_free(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise FSEFTError(f"{path} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def _planner_threads():
    """nnU-Net's planner calls torch.set_num_threads(nnUNet_n_proc_DA), which fails for the CPU-friendly 0."""
    value = os.environ.get("nnUNet_n_proc_DA")
    if value is not None and value.strip() == "0":
        os.environ["nnUNet_n_proc_DA"] = "1"
    try:
        yield
    finally:
        if value is not None:
            os.environ["nnUNet_n_proc_DA"] = value


def plan_with_preset(dataset, preset_name: str, configurations=("3d_fullres",), num_processes: int = 2,
                     overwrite: bool = False) -> str:
    """Fingerprint, plan (nnU-Net's ExperimentPlanner), apply the preset, preprocess. Returns the plans name."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)
    from nnunetv2.paths import nnUNet_preprocessed
    preset = load_preset(preset_name)
    name = _dataset_name(dataset)
    dataset_id = int(name[7:10])
    plans_name = preset.get("plans_name", "nnUNetPlans")
    plans_file = Path(nnUNet_preprocessed) / name / f"{plans_name}.json"
    _require_free(plans_file, overwrite)
    with _nnunet_step("dataset check", name):
        extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True)
    spacing = preset.get("spacing")
    with _planner_threads():
        plan_experiments([dataset_id], overwrite_plans_name=plans_name,
                         overwrite_target_spacing=tuple(spacing) if spacing else None)
    plans = apply_preset(json.loads(plans_file.read_text()), preset)
    plans_file.write_text(json.dumps(plans, indent=2))
    preprocess([dataset_id], plans_identifier=plans_name, configurations=list(configurations),
               num_processes=[num_processes] * len(configurations))
    return plans_name


def prepare_target(target, model_folder, num_processes: int = 2, overwrite: bool = False) -> str:
    """Preprocess TARGET with the plans in a foundation's model folder, so -pretrained_weights loads.

    nnU-Net's four manual steps (fingerprint, move plans, copy dataset.json, preprocess) in one call."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, preprocess
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    model_folder = Path(model_folder)
    for required in ("plans.json", "dataset.json"):
        if not (model_folder / required).is_file():
            raise FSEFTError(f"{model_folder} is not an nnU-Net model folder (no {required}); pass the folder "
                             "that holds plans.json, dataset.json and fold_X/ (nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG)")
    plans, foundation_json = _read_json(model_folder / "plans.json"), _read_json(model_folder / "dataset.json")
    name = _dataset_name(target)
    raw = Path(nnUNet_raw) / name
    target_json = json.loads((raw / "dataset.json").read_text())  # checked by _dataset_name
    n_target, n_found = len(target_json["channel_names"]), len(foundation_json["channel_names"])
    if n_target != n_found:
        raise FSEFTError(f"{name} has {n_target} input channel(s) but the foundation expects {n_found} "
                         f"({foundation_json['channel_names']}); the target must have the foundation's modalities")
    plans_file = Path(nnUNet_preprocessed) / name / f"{plans['plans_name']}.json"
    _require_free(plans_file, overwrite)
    with _nnunet_step("dataset check", name):
        extract_fingerprints([int(name[7:10])], num_processes=num_processes, check_dataset_integrity=True)
    example = next(iter(get_filenames_of_train_images_and_targets(str(raw), target_json).values()))["images"][0]
    plans["dataset_name"] = name
    plans["image_reader_writer"] = determine_reader_writer_from_dataset_json(
        target_json, example, allow_nonmatching_filename=True, verbose=False).__name__
    plans_file.write_text(json.dumps(plans, indent=2))
    # nnUNetv2_preprocess reads dataset.json from the preprocessed folder, which only planning writes
    shutil.copyfile(raw / "dataset.json", plans_file.parent / "dataset.json")
    configurations = [c for c, v in plans["configurations"].items() if "architecture" in v or "inherits_from" in v]
    configurations = [c for c in configurations if c == "3d_fullres"] or configurations[:1]
    preprocess([int(name[7:10])], plans_identifier=plans["plans_name"], configurations=configurations,
               num_processes=[num_processes] * len(configurations))
    return plans["plans_name"]
