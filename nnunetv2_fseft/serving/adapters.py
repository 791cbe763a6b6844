"""The adapters one pass serves: read, checked against the foundation and against each other, before anything runs.

An ADAPTER is an adapter folder written by nnUNetv2_fseft_export or a trained FSEFT model folder: both hold
plans.json, dataset.json and fold_X/adapter.{json,safetensors} (the trainer writes the same two files that export
copies), so both are read the same way. Every refusal is one line (FSEFTError) raised before any output is written.

Images are preprocessed once for all adapters, so all adapters must preprocess alike: the fields of their plans
and dataset.json that nnU-Net's preprocessing, sliding window and export read (`preprocessing_signature`) must be
equal, and their configuration and input space (spacing, normalisation, axis order) must be the foundation's.
Preprocessing then uses the adapters' plans: they are the foundation's plans as nnUNetv2_fseft_prepare_target
wrote them for the target (with the target's image reader), and they are what each adapter's own
nnUNetv2_predict reads, so each adapter's output equals that run's."""
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoints import read_adapter
from ..errors import FSEFTError
from ..export import check_config, check_foundation, model_json, trained_folds
from ..peft import METHODS

FIX_PLANS = ("adapters predicted together must be trained on targets prepared with the foundation's plans and "
             "configuration (nnUNetv2_fseft_prepare_target -d TARGET -m FOUNDATION)")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Adapter:
    """One adapter: its model files and, per fold, adapter.json and the tensors."""
    name: str
    folder: Path
    plans: dict
    dataset_json: dict
    folds: list                                   # fold folder names, e.g. ["fold_0"]
    configs: list = field(default_factory=list)   # adapter.json per fold
    tensors: list = field(default_factory=list)   # adapter tensors per fold

    @property
    def configuration(self) -> str:
        return self.configs[0]["configuration"]

    @property
    def method(self) -> str:
        return self.configs[0]["method"]

    @property
    def mirror_axes(self):
        axes = self.configs[0].get("inference_allowed_mirroring_axes")
        return tuple(axes) if axes is not None else None

    def managers(self) -> tuple:
        """nnU-Net's (PlansManager, ConfigurationManager, LabelManager) for this adapter."""
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        plans_manager = PlansManager(self.plans)
        return (plans_manager, plans_manager.get_configuration(self.configuration),
                plans_manager.get_label_manager(self.dataset_json))


def default_name(folder: Path) -> str:
    """The folder's name; a model folder (TRAINER__PLANS__CONFIG) is named DATASET__TRAINER."""
    parts = folder.name.split("__")
    return f"{folder.parent.name}__{parts[0]}" if len(parts) == 3 else folder.name


def parse_spec(spec: str) -> tuple:
    """'NAME=PATH' or 'PATH' -> (name, folder)."""
    name, sep, path = str(spec).partition("=")
    if not sep or not NAME.match(name) or Path(spec).exists():
        name, path = None, spec
    folder = Path(path)
    return name or default_name(folder.resolve()), folder


def _fold_folders(folder: Path, folds) -> list:
    if folds is None:
        return trained_folds(folder, "adapter.json")
    return [folder / f"fold_{f}" for f in folds]


def read_one(spec: str, folds, foundation) -> Adapter:
    name, folder = parse_spec(spec)
    if not folder.is_dir():
        raise FSEFTError(f"adapter {folder} does not exist; pass an adapter folder written by nnUNetv2_fseft_export "
                         "or a trained FSEFT model folder (nnUNet_results/DatasetX/FSEFT...Trainer__PLANS__CONFIG)")
    if not NAME.match(name):
        raise FSEFTError(f"adapter name {name!r} (from {folder}) is not a plain folder name; name it: NAME={folder}")
    plans, dataset_json = model_json(folder, "plans.json"), model_json(folder, "dataset.json")
    adapter = Adapter(name, folder, plans, dataset_json, [])
    for fold in _fold_folders(folder, folds):
        config, tensors = read_adapter(fold)
        check_config(config, fold)
        if config["method"] not in METHODS:
            raise FSEFTError(f"{fold}: adapter.json names unknown method {config['method']!r}; "
                             f"known: {', '.join(METHODS)}")
        check_foundation(config, fold, foundation.path, foundation.weights_sha256)
        if adapter.configs and config["configuration"] != adapter.configuration:
            raise FSEFTError(f"{fold} was trained as '{config['configuration']}' but {adapter.folds[0]} as "
                             f"'{adapter.configuration}'; pass folds of one configuration with -f")
        adapter.folds.append(fold.name)
        adapter.configs.append(config)
        adapter.tensors.append(tensors)
    return adapter


def preprocessing_signature(adapter: Adapter) -> dict:
    """What nnU-Net's preprocessing, sliding window and export read from the plans and dataset.json."""
    try:
        plans_manager, config, _ = adapter.managers()
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:
        raise FSEFTError(f"adapter {adapter.folder}: its plans.json cannot serve configuration "
                         f"'{adapter.configuration}' ({type(e).__name__}: {str(e)[:120]}); {FIX_PLANS}") from None
    c = config.configuration
    channels = adapter.dataset_json.get("channel_names") or adapter.dataset_json.get("modality") or {}
    return {
        "configuration": adapter.configuration,
        "spacing": list(config.spacing), "patch_size": list(config.patch_size),
        "normalization_schemes": list(config.normalization_schemes),
        "use_mask_for_norm": list(config.use_mask_for_norm),
        "preprocessor_name": config.preprocessor_name,
        "resampling_fn_data": c.get("resampling_fn_data"),
        "resampling_fn_data_kwargs": c.get("resampling_fn_data_kwargs"),
        "resampling_fn_probabilities": c.get("resampling_fn_probabilities"),
        "resampling_fn_probabilities_kwargs": c.get("resampling_fn_probabilities_kwargs"),
        "transpose_forward": list(plans_manager.transpose_forward),
        "image_reader_writer": adapter.plans.get("image_reader_writer"),
        "foreground_intensity_properties_per_channel": plans_manager.foreground_intensity_properties_per_channel,
        "channel_names": [str(v) for _, v in sorted(channels.items(), key=lambda kv: int(kv[0]))],
        "file_ending": adapter.dataset_json.get("file_ending"),
    }


# the foundation's input space: what its network was trained to see
FOUNDATION_FIELDS = ("configuration", "spacing", "normalization_schemes", "transpose_forward")


def _foundation_signature(foundation) -> dict:
    if foundation.plans is None or foundation.configuration is None:
        return {}
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans_manager = PlansManager(foundation.plans)
    config = plans_manager.get_configuration(foundation.configuration)
    return {"configuration": foundation.configuration, "spacing": list(config.spacing),
            "normalization_schemes": list(config.normalization_schemes),
            "transpose_forward": list(plans_manager.transpose_forward)}


def check_compatible(adapters: list, foundation) -> None:
    """Refuse adapters that cannot share one preprocessing and one foundation (one line each)."""
    reference = _foundation_signature(foundation)
    first, first_signature = None, None
    for adapter in adapters:
        if reference and adapter.configuration != reference["configuration"]:
            raise FSEFTError(f"adapter {adapter.folder} was trained as '{adapter.configuration}' but the foundation "
                             f"{foundation.path} as '{reference['configuration']}'; {FIX_PLANS}")
        signature = preprocessing_signature(adapter)
        for key in FOUNDATION_FIELDS if reference else ():
            if signature[key] != reference[key]:
                raise FSEFTError(f"adapter {adapter.folder} was trained on other plans or another configuration than "
                                 f"the foundation {foundation.path}: '{key}' is {signature[key]} there but "
                                 f"{reference[key]} in the foundation; {FIX_PLANS}")
        _, config, label_manager = adapter.managers()
        if config.previous_stage_name is not None:
            raise FSEFTError(f"adapter {adapter.folder} is a cascade stage ('{adapter.configuration}' needs the "
                             f"segmentations of '{config.previous_stage_name}'); predict it with nnUNetv2_predict "
                             "-prev_stage_predictions")
        if first is None:
            first, first_signature = adapter, signature
            continue
        for key, value in signature.items():
            if value != first_signature[key]:
                raise FSEFTError(f"adapters {first.folder} and {adapter.folder} were trained on other plans or "
                                 f"configurations ('{key}' is {first_signature[key]} in the first, {value} in the "
                                 f"second), so one preprocessing cannot serve both; {FIX_PLANS}")
        if adapter.folds != first.folds:
            raise FSEFTError(f"adapters {first.folder} ({', '.join(first.folds)}) and {adapter.folder} "
                             f"({', '.join(adapter.folds)}) have other folds; choose folds all of them have with -f")


def read_adapters(specs: list, foundation, folds=None) -> list:
    """The adapters named by `specs` ('PATH' or 'NAME=PATH'), checked; `folds` None: the folds each one has."""
    if not specs:
        raise FSEFTError("no adapter given; pass -a ADAPTER [ADAPTER ...]")
    adapters = [read_one(spec, folds, foundation) for spec in specs]
    names = [a.name for a in adapters]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        paths = [str(a.folder) for a in adapters if a.name == duplicate]
        raise FSEFTError(f"two adapters are named '{duplicate}' ({', '.join(paths)}); name them: -a NAME=PATH ...")
    check_compatible(adapters, foundation)
    return adapters
