"""Export an adapted model: merged into a stock nnU-Net model folder, or as adapter files only.

A merged export predicts with stock nnU-Net (trainer_name 'nnUNetTrainer', no plugin needed). An adapter
export holds the trained tensors + a pointer to the foundation; `apply_adapter` rebuilds the model folder.
"""
import shutil
from pathlib import Path

import torch

from .checkpoints import apply_foundation, load_adapter_tensors, read_adapter, save_adapter
from .errors import FSEFTError
from .files import atomic_write, sha256
from .foundations import read_foundation
from .foundations.nnunet import read_model_json
from .networks import build_adapted_network
from .peft import METHODS, is_mergeable, merge_peft

MODEL_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json")
STOCK_TRAINER = "nnUNetTrainer"


def model_json(folder: Path, name: str) -> dict:
    path = folder / name
    if not path.is_file():
        raise FSEFTError(f"{folder} is not an nnU-Net model folder (no {name}); pass "
                         "nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG")
    return read_model_json(path)


def trained_folds(folder: Path, required: str) -> list:
    folds = sorted(p for p in folder.glob("fold_*") if (p / required).is_file())
    if not folds:
        raise FSEFTError(f"{folder} has no fold_X/{required}; train first (nnUNetv2_train ... -tr FSEFT...Trainer)")
    return folds


class OutputFolder:
    """Build the output in a hidden sibling folder and move it into place only when complete."""

    def __init__(self, out, overwrite: bool):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise FSEFTError(f"output folder {self.out} exists; pass --overwrite to replace it")
        self.tmp = self.out.parent / f".{self.out.name}.partial"

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, *_):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():
            shutil.rmtree(self.out)
        self.tmp.rename(self.out)
        return False


def _copy_model_files(src: Path, dst: Path) -> None:
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def check_config(config, source) -> dict:
    missing = [k for k in ("method", "options", "configuration", "trainer_name")
               if not isinstance(config, dict) or k not in config]
    if missing:
        raise FSEFTError(f"{source}: adapter.json has no '{missing[0]}'; it was not written by an FSEFT trainer or "
                         "nnUNetv2_fseft_export: export the adapter again")
    return config


def rebuild(plans: dict, dataset_json: dict, config: dict, source) -> torch.nn.Module:
    check_config(config, source)
    if config.get("method") not in METHODS:
        raise FSEFTError(f"{source}: adapter.json names unknown method {config.get('method')!r}; "
                         f"known: {', '.join(METHODS)}")
    return build_adapted_network(plans, config["configuration"], dataset_json, config["method"], config["options"])


def _save_model(network, checkpoint: dict, path: Path) -> None:
    checkpoint = dict(checkpoint, network_weights=network.state_dict(), optimizer_state=None, grad_scaler_state=None)
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def _merge_or_explain(network, config: dict) -> None:
    if not is_mergeable(network):
        raise FSEFTError(f"method '{config['method']}' cannot be merged into plain convolutions (its adapters are "
                         f"nonlinear); export without --merge and predict with -tr {config['trainer_name']}")
    merge_peft(network)


def export_model(model_folder, out_folder, merge: bool, overwrite: bool = False) -> Path:
    """Merged stock model folder (merge=True) or adapter-only folder (merge=False) from a trained one."""
    model_folder = Path(model_folder)
    plans, dataset_json = model_json(model_folder, "plans.json"), model_json(model_folder, "dataset.json")
    folds = trained_folds(model_folder, "adapter.json")
    with OutputFolder(out_folder, overwrite) as out:
        _copy_model_files(model_folder, out)
        for fold in folds:
            (out / fold.name).mkdir()
            if not merge:
                for name in ("adapter.json", "adapter.safetensors"):
                    shutil.copyfile(fold / name, out / fold.name / name)
                continue
            config = read_adapter(fold)[0]
            if not (fold / "checkpoint_final.pth").is_file():
                raise FSEFTError(f"{fold} has adapter files but no checkpoint_final.pth (an adapter export?); fix: "
                                 "rebuild with nnUNetv2_fseft_export --apply ADAPTER_FOLDER FOUNDATION_CHECKPOINT "
                                 "OUT_FOLDER --merge")
            checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
            network = rebuild(plans, dataset_json, config, fold)
            network.load_state_dict(checkpoint["network_weights"])
            _merge_or_explain(network, config)
            _save_model(network, dict(checkpoint, trainer_name=STOCK_TRAINER), out / fold.name / "checkpoint_final.pth")
    return Path(out_folder)


def check_foundation(config: dict, fold: Path, path, weights: str) -> None:
    """Refuse a foundation with other weights than the adapter's. The weights' digest lets a copy that differs only
    in its log or optimizer state through; adapters recorded before it carry the file's sha256, checked as such."""
    recorded = config.get("foundation") or {}
    key, given = ("weights_sha256", weights) if recorded.get("weights_sha256") else ("sha256", sha256(path))
    trained_on = recorded.get(key)
    if trained_on and trained_on != given:
        what = "network-weights sha256" if key == "weights_sha256" else "file sha256"
        raise FSEFTError(f"{fold}: this adapter was trained on another foundation ({what} {trained_on[:12]}…, "
                         f"given {given[:12]}…); pass the checkpoint named in adapter.json: {recorded.get('path')}")


def apply_adapter(adapter_folder, foundation_checkpoint, out_folder, merge: bool = False, overwrite: bool = False) -> Path:
    """Foundation (model folder, nnU-Net or nnssl checkpoint) + adapter files -> a full model folder that
    nnUNetv2_predict uses."""
    adapter_folder = Path(adapter_folder)
    plans, dataset_json = model_json(adapter_folder, "plans.json"), model_json(adapter_folder, "dataset.json")
    folds = trained_folds(adapter_folder, "adapter.json")
    foundation = read_foundation(foundation_checkpoint)  # model folder, nnU-Net or nnssl checkpoint
    with OutputFolder(out_folder, overwrite) as out:
        _copy_model_files(adapter_folder, out)
        for fold in folds:
            config, tensors = read_adapter(fold)
            check_config(config, fold)
            check_foundation(config, fold, foundation.path, foundation.weights_sha256)
            network = rebuild(plans, dataset_json, config, fold)
            apply_foundation(network, foundation, dataset_json)  # also marks a channel-mapped stem as trained
            load_adapter_tensors(network, tensors, fold)
            trainer_name = config["trainer_name"]
            if merge:
                _merge_or_explain(network, config)
                trainer_name = STOCK_TRAINER
            axes = config.get("inference_allowed_mirroring_axes")
            checkpoint = {"logging": None, "_best_ema": None, "current_epoch": 0, "trainer_name": trainer_name,
                          "init_args": {"plans": plans, "configuration": config["configuration"],
                                        "fold": config.get("fold", 0), "dataset_json": dataset_json,
                                        "device": torch.device("cpu")},
                          "inference_allowed_mirroring_axes": tuple(axes) if axes is not None else None}
            (out / fold.name).mkdir()
            _save_model(network, checkpoint, out / fold.name / "checkpoint_final.pth")
            if not merge:
                save_adapter(network, out / fold.name, config)
    return Path(out_folder)
