"""Plan presets and "prepare a target like the foundation", on top of nnU-Net's own planning API.

Nothing here re-implements planning or preprocessing: nnU-Net plans, we adjust a few documented fields
of its plans, and nnU-Net preprocesses.
"""
import contextlib
import copy
import json
import os
import shutil
from importlib import resources
from pathlib import Path

from .errors import FSEFTError
from .foundations.nnunet import read_model_json
from .foundation_plans import (BATCH_SIZE, CPU_PATCH_EDGE, MemoryEstimate, channel_rule, channel_sources, check_patch,
                               fit_patch, foundation_configuration, remap_channels, total_stride)


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
    # PlainConvUNet: n_conv_per_stage; ResidualEncoderUNet: n_blocks_per_stage (1, 3, 4, 6, ...: kept per stage)
    blocks_key = "n_conv_per_stage" if "n_conv_per_stage" in kwargs else "n_blocks_per_stage"
    blocks = list(kwargs[blocks_key]) + [kwargs[blocks_key][-1]] * n
    blocks_decoder = kwargs["n_conv_per_stage_decoder"][0]
    old_features = kwargs["features_per_stage"]
    kwargs.update({"n_stages": n, "strides": [list(s) for s in strides], "kernel_sizes": [list(k) for k in kernels],
                   blocks_key: blocks[:n], "n_conv_per_stage_decoder": [blocks_decoder] * (n - 1),
                   "features_per_stage": [min(old_features[0] * 2 ** i, max(old_features)) for i in range(n)]})
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
    """Fingerprint, plan (nnU-Net's planner: ExperimentPlanner, or the preset's "planner", e.g. nnU-Net's
    nnUNetPlannerResEncM), apply the preset, preprocess. Returns the plans name."""
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
        plan_experiments([dataset_id], experiment_planner_class_name=preset.get("planner", "ExperimentPlanner"),
                         overwrite_plans_name=plans_name, overwrite_target_spacing=tuple(spacing) if spacing else None)
    plans = apply_preset(json.loads(plans_file.read_text()), preset)
    plans_file.write_text(json.dumps(plans, indent=2))
    preprocess([dataset_id], plans_identifier=plans_name, configurations=list(configurations),
               num_processes=[num_processes] * len(configurations))
    return plans_name


NNSSL_PLANS = "nnsslPlans"
SPACING_MODES = ("like_pretrained", "dataset")


def prepare_target(target, source, num_processes: int = 2, overwrite: bool = False, configurations=None,
                   plans_name: str = None, spacing="like_pretrained", patch_size=None, cpu: bool = False,
                   gpu_memory_target: float = 8.0, log=None) -> str:
    """Plan and preprocess TARGET for adapting SOURCE; returns the plans name.

    SOURCE is an nnU-Net model folder or checkpoint (its plans are moved to the target: nnU-Net's fingerprint,
    move-plans, copy dataset.json, preprocess) or an nnssl checkpoint (nnU-Net plans the target, then its
    3d_fullres network becomes the checkpoint's). `log` receives the lines a user should see."""
    log = log or (lambda line: None)
    name = _dataset_name(target)
    target_json = json.loads((_raw_folder(name) / "dataset.json").read_text())  # checked by _dataset_name
    source = Path(source)
    if source.is_dir() or (not source.exists() and source.suffix != ".pth"):
        foundation = _model_folder_foundation(source)
    elif source.is_file():
        from .foundations import read_foundation
        foundation = read_foundation(source)
    else:
        raise FSEFTError(f"foundation {source} does not exist; pass an nnU-Net model folder "
                         "(nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG), its fold_X/checkpoint_final.pth, "
                         "or an nnssl checkpoint .pth")
    rule = channel_rule(foundation, target_json)
    if rule:
        log(rule)
    if foundation.source == "nnssl":
        plans, weights = _plan_like_nnssl(name, foundation, target_json, num_processes, overwrite, configurations,
                                          plans_name, spacing, patch_size, cpu, gpu_memory_target, log)
    else:
        plans, weights = _plan_like_model(name, foundation, target_json, num_processes, overwrite, configurations,
                                          plans_name, spacing, patch_size, cpu, log)
    chosen = configurations or [_default_configuration(foundation, plans)]
    _preprocess(name, plans, chosen, num_processes, log)
    untrained = [c for c in chosen if foundation.configuration and c != foundation.configuration]
    if untrained:
        log(f"note: the foundation's weights are a {foundation.configuration} network; adapt "
            f"{', '.join(untrained)} from a model folder trained as that configuration (same plans)")
    trainer = "FSEFTDecoderLoRATrainer" if foundation.parts == "encoder" else "FSEFTLoRATrainer"
    log(f"next: nnUNetv2_train {int(name[7:10])} {chosen[0]} FOLD -p {plans['plans_name']} -tr {trainer} "
        f"-pretrained_weights {weights}")
    return plans["plans_name"]


def _raw_folder(name: str) -> Path:
    from nnunetv2.paths import nnUNet_raw
    return Path(nnUNet_raw) / name


class _ModelFolder:
    """The parts of an nnU-Net model folder that planning needs (read_foundation's fields), without its weights."""
    source, parts, citations = "nnunet", "network", []

    def __init__(self, folder: Path, plans: dict, dataset_json: dict, configuration):
        self.path, self.plans, self.dataset_json, self.configuration = folder, plans, dataset_json, configuration
        self.channel_names = dataset_json.get("channel_names")
        self.num_input_channels = len(self.channel_names or {})


def _model_folder_foundation(folder: Path) -> _ModelFolder:
    for required in ("plans.json", "dataset.json"):
        if not (folder / required).is_file():
            raise FSEFTError(f"{folder} is not an nnU-Net model folder (no {required}); pass the folder "
                             "that holds plans.json, dataset.json and fold_X/ (nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG), "
                             "its fold_X/checkpoint_final.pth, or an nnssl checkpoint .pth")
    plans, dataset_json = read_model_json(folder / "plans.json"), read_model_json(folder / "dataset.json")
    parts = folder.name.split("__")  # TRAINER__PLANS__CONFIG: the configuration its weights were trained as
    configuration = parts[-1] if len(parts) == 3 and parts[-1] in plans.get("configurations", {}) else None
    return _ModelFolder(folder, plans, dataset_json, configuration)


def _default_configuration(foundation, plans: dict) -> str:
    names = [c for c, v in plans["configurations"].items() if "architecture" in v or "inherits_from" in v]
    if foundation.configuration in names:
        return foundation.configuration
    return "3d_fullres" if "3d_fullres" in names else names[0]


def _weights_file(foundation) -> str:
    if foundation.path.is_file():
        return str(foundation.path)
    folds = sorted(foundation.path.glob("fold_*/checkpoint_final.pth"))
    return str(folds[0] if folds else foundation.path / "fold_0" / "checkpoint_final.pth")


def _rename_plans(plans: dict, plans_name: str) -> None:
    """-p NAME: the plans and their data identifiers take the new name, as nnU-Net's move_plans does."""
    old = plans["plans_name"]
    plans["plans_name"] = plans_name
    for config in plans["configurations"].values():
        if "data_identifier" in config and config["data_identifier"].startswith(old):
            config["data_identifier"] = plans_name + config["data_identifier"][len(old):]


def _network_stride(config: dict) -> list:
    kwargs = config["architecture"]["arch_kwargs"]
    ndim = len(config["patch_size"])
    return total_stride(kwargs, ndim)


def _fingerprint(name: str, num_processes: int) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints
    with _nnunet_step("dataset check", name):
        extract_fingerprints([int(name[7:10])], num_processes=num_processes, check_dataset_integrity=True)


def _plan_like_model(name, foundation, target_json, num_processes, overwrite, configurations, plans_name,
                     spacing, patch_size, cpu, log):
    """nnU-Net's four manual steps (fingerprint, move plans, copy dataset.json, then preprocess) in one call."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    if spacing not in (None, "like_pretrained"):
        raise FSEFTError("--spacing applies to nnssl checkpoints; an nnU-Net foundation's plans keep their spacing "
                         "(its network was trained at it): leave --spacing out")
    plans = copy.deepcopy(foundation.plans)
    known = [c for c, v in plans["configurations"].items() if "architecture" in v or "inherits_from" in v]
    for c in configurations or []:
        if c not in known:
            raise FSEFTError(f"configuration '{c}' is not in the foundation's plans; pass one of: {', '.join(known)}")
    if plans_name:
        _rename_plans(plans, plans_name)
    chosen = configurations or [_default_configuration(foundation, plans)]
    if patch_size or cpu:
        for c in {_own_configuration(plans, c) for c in chosen}:
            config = plans["configurations"][c]
            stride = _network_stride(config)
            patch = check_patch(patch_size, stride) if patch_size else \
                fit_patch(config["patch_size"], stride, lambda p: True, cap=[CPU_PATCH_EDGE] * len(stride))
            config.update(patch_size=patch, batch_size=BATCH_SIZE)
            log(f"{c}: patch {patch} (a multiple of the network's total stride {stride}), batch {BATCH_SIZE}")
    plans_file = Path(nnUNet_preprocessed) / name / f"{plans['plans_name']}.json"
    _require_free(plans_file, overwrite)
    log(f"foundation: nnU-Net model {foundation.path} ({_class_name(plans, chosen[0])}, trained as "
        f"{foundation.configuration or 'unknown configuration'}): its plans are used for {name}")
    _fingerprint(name, num_processes)
    mapping = channel_sources(foundation, target_json)
    if mapping is not None:
        fingerprint = json.loads((plans_file.parent / "dataset_fingerprint.json").read_text())
        remap_channels(plans, *mapping[:1], fingerprint["foreground_intensity_properties_per_channel"], mapping[1])
    raw = _raw_folder(name)
    example = next(iter(get_filenames_of_train_images_and_targets(str(raw), target_json).values()))["images"][0]
    plans["dataset_name"] = name
    plans["image_reader_writer"] = determine_reader_writer_from_dataset_json(
        target_json, example, allow_nonmatching_filename=True, verbose=False).__name__
    plans["pretrain_info"] = {"source": "nnunet", "path": str(foundation.path.resolve()),
                              "configuration": foundation.configuration, "citations": list(foundation.citations)}
    plans_file.write_text(json.dumps(plans, indent=2))
    # nnUNetv2_preprocess reads dataset.json from the preprocessed folder, which only planning writes
    shutil.copyfile(raw / "dataset.json", plans_file.parent / "dataset.json")
    return plans, _weights_file(foundation)


def _own_configuration(plans: dict, configuration: str) -> str:
    """The configuration that holds the architecture and patch (3d_cascade_fullres inherits 3d_fullres's)."""
    config = plans["configurations"][configuration]
    return _own_configuration(plans, config["inherits_from"]) if "architecture" not in config else configuration


def _class_name(plans: dict, configuration: str) -> str:
    config = plans["configurations"][_own_configuration(plans, configuration)]
    return config["architecture"]["network_class_name"].rsplit(".", 1)[-1]


def _target_spacing(spacing, foundation, log):
    """nnU-Net's overwrite_target_spacing for the chosen --spacing mode (None: nnU-Net's own choice)."""
    if spacing in (None, "like_pretrained"):
        pretrained = foundation.preprocessing.get("spacing")
        if pretrained is None:
            log("spacing: the checkpoint records none; the dataset's own (nnU-Net's choice) is used")
            return None
        log(f"spacing: {list(pretrained)} (the checkpoint's, like_pretrained)")
        return tuple(float(s) for s in pretrained)
    if spacing == "dataset":
        log("spacing: the dataset's own (nnU-Net's choice)")
        return None
    values = list(spacing)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in values):
        raise FSEFTError(f"--spacing {spacing!r} is not one of {', '.join(SPACING_MODES)} or three positive "
                         "numbers (mm, nnU-Net's axis order); e.g. --spacing 1 1 1")
    log(f"spacing: {values} (fixed)")
    return tuple(float(v) for v in values)


def _plan_like_nnssl(name, foundation, target_json, num_processes, overwrite, configurations, plans_name,
                     spacing, patch_size, cpu, gpu_memory_target, log):
    """nnU-Net fingerprints and plans the target; its 3d_fullres then takes the checkpoint's network and
    normalization, a patch that fits that network, the data and the memory, and batch 2."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiments
    from nnunetv2.paths import nnUNet_preprocessed
    if configurations and configurations != ["3d_fullres"]:
        raise FSEFTError(f"an nnssl checkpoint is a 3D network: only 3d_fullres applies (got -c {' '.join(configurations)})")
    plans_name = plans_name or NNSSL_PLANS
    plans_file = Path(nnUNet_preprocessed) / name / f"{plans_name}.json"
    _require_free(plans_file, overwrite)
    architecture = foundation.architecture
    log(f"foundation: nnssl checkpoint {foundation.path} ({architecture['network_class_name'].rsplit('.', 1)[-1]}, "
        f"{'encoder + stem: decoder and head start fresh' if foundation.parts == 'encoder' else 'whole network'})")
    for citation in foundation.citations:
        log(f"cite: {_citation_line(citation)}")
    stride = total_stride(architecture["arch_kwargs"], 3)
    if patch_size:
        patch_size = check_patch(patch_size, stride)
    target_spacing = _target_spacing(spacing, foundation, log)
    _fingerprint(name, num_processes)
    with _planner_threads():
        plan_experiments([int(name[7:10])], overwrite_plans_name=plans_name, gpu_memory_target_in_gb=gpu_memory_target,
                         overwrite_target_spacing=target_spacing)
    try:
        plans = _nnssl_configuration(json.loads(plans_file.read_text()), foundation, target_json, spacing, stride,
                                     patch_size, cpu, gpu_memory_target, log)
    except BaseException:  # the planner's file must not stay behind half-adapted
        plans_file.unlink(missing_ok=True)
        raise
    plans_file.write_text(json.dumps(plans, indent=2))
    return plans, str(foundation.path)


def _nnssl_configuration(plans, foundation, target_json, spacing, stride, patch_size, cpu, gpu_memory_target, log):
    architecture = foundation.architecture
    planned = plans["configurations"]["3d_fullres"]
    n_channels, n_classes = len(target_json["channel_names"]), len(target_json["labels"])
    median = planned["median_image_size_in_voxels"]
    recommended = foundation.preprocessing.get("recommended_patch_size")
    if patch_size:
        patch, why = patch_size, "--patch-size"
    elif cpu:
        patch, why = fit_patch(median, stride, lambda p: True, cap=[CPU_PATCH_EDGE] * len(stride)), "--cpu"
    else:
        memory = MemoryEstimate(architecture, n_channels, n_classes, gpu_memory_target)
        patch = fit_patch(median, stride, lambda p: memory.fits(p, BATCH_SIZE), cap=recommended)
        why = f"fits the data (median {[round(m) for m in median]}) and {gpu_memory_target:g} GB"
    config = foundation_configuration(planned, architecture, foundation.preprocessing, n_channels, patch)
    # nnssl networks are 3D and fixed: the planner's 2d and 3d_lowres would be other, untrained networks
    plans["configurations"] = {"3d_fullres": config}
    plans["pretrain_info"] = {"source": "nnssl", "path": str(foundation.path.resolve()),
                              "weights_sha256": foundation.weights_sha256, "parts": foundation.parts,
                              "spacing_mode": spacing if isinstance(spacing, str) or spacing is None else list(spacing),
                              "citations": list(foundation.citations)}
    log(f"3d_fullres: patch {patch} ({why}; a multiple of the network's total stride {stride}), batch {BATCH_SIZE}, "
        f"normalization {', '.join(config['normalization_schemes'])}")
    return plans


def _citation_line(citation) -> str:
    if not isinstance(citation, dict):
        return str(citation)
    text = citation.get("apa_citations") or citation.get("bibtex_citations") or ""
    text = " ".join(text) if isinstance(text, (list, tuple)) else str(text)
    label = " ".join(str(citation[k]) for k in ("type", "name") if citation.get(k))
    return f"{label}: {' '.join(text.split())}" if label else " ".join(text.split())


def _preprocess(name: str, plans: dict, configurations, num_processes: int, log) -> None:
    """nnU-Net preprocesses each chosen configuration once per data identifier (a cascade shares 3d_fullres's)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    manager, seen, todo = PlansManager(plans), set(), []
    for c in configurations:
        identifier = manager.get_configuration(c).data_identifier
        if identifier not in seen:
            seen.add(identifier)
            todo.append(c)
    preprocess([int(name[7:10])], plans_identifier=plans["plans_name"], configurations=todo,
               num_processes=[num_processes] * len(todo))
    log(f"preprocessed {name} for {', '.join(configurations)} with plans {plans['plans_name']}")
    others = [c for c in plans["configurations"] if manager.get_configuration(c).data_identifier not in seen]
    if others:
        log(f"other configurations in these plans: {', '.join(others)}; preprocess one with "
            f"nnUNetv2_preprocess -d {int(name[7:10])} -plans_name {plans['plans_name']} -c {others[0]}")
    if "3d_cascade_fullres" in configurations:
        log("3d_cascade_fullres trains on the 3d_lowres predictions: train 3d_lowres first (every fold, or fold all)")
