"""Zero-shot baseline ("Generalization" in the FSEFT study): the foundation segments the target's classes
with no training at all.

The foundation's weights go into a stock nnU-Net network with the target's label layout; each target class
takes the foundation's head channel of the same name (as for the FSEFT trainers). The result is an ordinary
model folder (trainer_name 'nnUNetTrainer') that nnU-Net's predictor runs on the query cases; nnU-Net's own
evaluation scores them. Files land where an FSEFT trainer's final validation would put them:
  nnUNet_results/DatasetT/FSEFTZeroShot__PLANS__CONFIG/fold_F/validation/summary.json
"""
import shutil
from pathlib import Path

import torch

from .checkpoints import apply_foundation, channel_names
from .errors import FSEFTError
from .export import STOCK_TRAINER
from .files import atomic_write, read_json, write_json
from .foundations import read_foundation
from .foundations.nnunet import read_model_json
from .networks import build_plain_network

TRAINER_NAME = "FSEFTZeroShot"


def _foundation_files(model_folder: Path, fold) -> tuple:
    for name in ("plans.json", "dataset.json"):
        if not (model_folder / name).is_file():
            raise FSEFTError(f"{model_folder} is not an nnU-Net model folder (no {name}); pass "
                             "nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG of the foundation")
    checkpoint = model_folder / f"fold_{fold}" / "checkpoint_final.pth"
    if not checkpoint.is_file():
        raise FSEFTError(f"{checkpoint} does not exist; train the foundation's fold {fold} first or pass "
                         "--foundation_fold")
    return read_model_json(model_folder / "plans.json"), checkpoint


def _target(target) -> tuple:
    from nnunetv2.paths import nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        name = maybe_convert_to_dataset_name(target)
    except RuntimeError:
        raise FSEFTError(f"no dataset {target} in nnUNet_raw/nnUNet_preprocessed; create it first") from None
    raw = Path(nnUNet_raw) / name
    if not (raw / "dataset.json").is_file():
        raise FSEFTError(f"{raw} has no dataset.json; the target must be an nnU-Net raw dataset")
    return name, raw, read_json(raw / "dataset.json", "fix: repair the file")


def query_cases(name: str, raw: Path, dataset_json: dict, fold: int) -> list:
    """The val cases of `fold` in the target's splits_final.json (the few-shot query set), else every case."""
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    cases = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    splits_file = Path(nnUNet_preprocessed) / name / "splits_final.json"
    if not splits_file.is_file():
        return sorted(cases)
    splits = read_json(splits_file, "write the few-shot splits again (nnUNetv2_fseft_fewshot_splits)")
    if fold >= len(splits):
        raise FSEFTError(f"{splits_file} has {len(splits)} folds, no fold {fold}; pass -f 0..{len(splits) - 1}")
    return list(splits[fold]["val"])


def build_zeroshot_model(foundation_folder, target, fold: int = 0, foundation_fold=0,
                         overwrite: bool = False) -> Path:
    """Write the zero-shot model folder for TARGET; returns it. Refuses a target with no class of the
    foundation's, since nothing would be predicted."""
    from nnunetv2.paths import nnUNet_results
    foundation_folder = Path(foundation_folder)
    plans, checkpoint_file = _foundation_files(foundation_folder, foundation_fold)
    name, _, target_json = _target(target)
    configuration = foundation_folder.name.split("__")[-1]
    if configuration not in plans["configurations"]:
        raise FSEFTError(f"cannot tell the configuration from {foundation_folder.name}; expected "
                         "TRAINER__PLANS__CONFIG as nnUNetv2_train names its output folders")
    foundation = read_foundation(checkpoint_file)
    network = build_plain_network(plans, configuration, target_json)
    lines = [line for line in apply_foundation(network, foundation, target_json).lines if line.startswith("head:")]
    if not any("<- foundation" in line for line in lines):
        raise FSEFTError(f"none of {name}'s classes is named like a foundation class ({'; '.join(lines)}); "
                         "zero-shot needs shared class names: adapt with an FSEFT trainer instead")
    state = network.state_dict()
    _silence_unmapped(state, target_json, foundation.weights, foundation.dataset_json)
    network.load_state_dict(state)

    out = Path(nnUNet_results) / name / f"{TRAINER_NAME}__{plans['plans_name']}__{configuration}"
    fold_dir = out / f"fold_{fold}"
    if fold_dir.exists() and not overwrite:
        raise FSEFTError(f"{fold_dir} exists; pass --overwrite to redo the zero-shot baseline")
    shutil.rmtree(fold_dir, ignore_errors=True)
    fold_dir.mkdir(parents=True)
    write_json(out / "plans.json", plans)
    write_json(out / "dataset.json", target_json)
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)  # read_foundation vetted it
    init_args = dict(checkpoint.get("init_args", {}), dataset_json=target_json, fold=fold)
    saved = {**checkpoint, "network_weights": network.state_dict(), "optimizer_state": None,
             "grad_scaler_state": None, "trainer_name": STOCK_TRAINER, "init_args": init_args}
    atomic_write(fold_dir / "checkpoint_final.pth", lambda tmp: torch.save(saved, tmp))
    (fold_dir / "zeroshot.log").write_text("\n".join([f"foundation: {checkpoint_file}"] + lines) + "\n")
    return out


def _silence_unmapped(state: dict, target_json: dict, pretrained: dict, foundation_json: dict) -> None:
    """A target class the foundation never saw is never predicted (weight 0, bias -30), not guessed at random."""
    foundation_json = foundation_json or {}
    head = [k for k in state if ".seg_layers." in k]
    names, _ = channel_names(target_json, state[next(k for k in head if k.endswith("weight"))].shape[0])
    known, _ = channel_names(foundation_json, pretrained[next(k for k in head if k.endswith("weight"))].shape[0])
    for index, name in enumerate(names):
        if name != "background" and name not in (known or []):
            for key in head:
                state[key][index] = -30.0 if key.endswith("bias") else 0.0


def predict_and_evaluate(model_folder, target, fold: int = 0, device: str = "cpu") -> dict:
    """nnU-Net's predictor on the query cases, nnU-Net's evaluation against their labels; returns summary.json."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder2
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets
    model_folder = Path(model_folder)
    name, raw, dataset_json = _target(target)
    cases = query_cases(name, raw, dataset_json, fold)
    files = get_filenames_of_train_images_and_targets(str(raw), dataset_json)
    out = model_folder / f"fold_{fold}" / "validation"
    out.mkdir(parents=True, exist_ok=True)
    predictor = nnUNetPredictor(device=torch.device(device), perform_everything_on_device=device != "cpu",
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(model_folder), use_folds=(fold,))
    predictor.predict_from_files([files[c]["images"] for c in cases], [str(out / c) for c in cases],
                                 num_processes_preprocessing=1, num_processes_segmentation_export=1)
    # nnU-Net 2.8's compute_metrics_on_folder2 writes summary.json but returns None
    compute_metrics_on_folder2(str(raw / "labelsTr"), str(out), str(model_folder / "dataset.json"),
                               str(model_folder / "plans.json"), str(out / "summary.json"), num_processes=1, chill=True)
    return read_json(out / "summary.json")
