"""A pseudo-labelled nnU-Net dataset: the target's supports (their own labels), the target fold's validation cases
(scored as before), and unlabelled scans whose untrusted voxels carry nnU-Net's ignore label.

nnU-Net leaves ignore-label voxels out of the loss and samples patches around annotated voxels
(documentation/ignore_label.md). The dataset is planned with the target's own plans file (copied), so a network
trained on it is the target's network and the foundation's weights load as they do for the target.

Supports keep their weight: nnU-Net's loader draws a training case uniformly from the split's 'train' list, so each
support is listed `support_repeats` times, enough that the supports are drawn at least as often as all
pseudo-labelled cases together. No torch here.
"""
import math
import shutil
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ..data.nnunet_raw import Geometry, link_file, staged_output, training_cases, write_dataset_json, write_label_map
from ..errors import FSEFTError
from ..files import read_json, write_json

PSEUDO_PREFIX = "pseudo_"  # pseudo-labelled cases' ids: never clash with a labelled case of the same scan


def ignore_value(dataset_json: dict) -> int:
    """nnU-Net's rule: the ignore label is the highest label + 1."""
    labels = dataset_json["labels"]
    if "ignore" in labels:
        raise FSEFTError("the target's dataset.json already declares an 'ignore' label; fix: pseudo-label a target "
                         "without one (nnU-Net allows a single ignore label)")
    values = [v if isinstance(v, int) else None for v in labels.values()]
    if None in values:
        raise FSEFTError("the target's labels are regions; fix: pseudo-labelling needs integer labels")
    return max(values) + 1


def support_repeats(n_supports: int, n_pseudo: int) -> int:
    return max(1, math.ceil(n_pseudo / max(n_supports, 1)))


def write_raw(out_id: int, name: str, target_raw: Path, target_json: dict, supports: Sequence[str],
              val_cases: Sequence[str], pseudo: Dict[str, tuple], overwrite: bool, description: str) -> Path:
    """nnUNet_raw/DatasetOUT_NAME with supports and val cases linked from the target (never modified) and each
    pseudo case's label map written as label where trusted, ignore elsewhere.

    pseudo: case id -> (image files, label array, trusted mask, Geometry of the first image)."""
    cases = training_cases(target_raw, target_json)
    missing = [c for c in [*supports, *val_cases] if c not in cases]
    if missing:
        raise FSEFTError(f"case '{missing[0]}' of the target's split is not in {target_raw}/labelsTr; fix: check "
                         "the fold (-f) against nnUNet_preprocessed/TARGET/splits_final.json")
    ignore = ignore_value(target_json)
    ending = target_json["file_ending"]
    with staged_output(out_id, name, overwrite, source_folders=[target_raw]) as staging:
        for case in dict.fromkeys([*supports, *val_cases]):
            images, label = cases[case]
            for c, image in enumerate(images):
                link_file(image, staging / "imagesTr" / f"{case}_{c:04d}{ending}")
            link_file(label, staging / "labelsTr" / f"{case}{ending}")
        for case, (images, label, trusted, geometry) in pseudo.items():
            for c, image in enumerate(images):
                link_file(image, staging / "imagesTr" / f"{PSEUDO_PREFIX}{case}_{c:04d}{ending}")
            write_label_map(np.where(trusted, label, ignore), geometry,
                            staging / "labelsTr" / f"{PSEUDO_PREFIX}{case}{ending}")
        dataset_json = {k: v for k, v in target_json.items() if k not in ("dataset", "numTraining")}
        dataset_json["labels"] = {**target_json["labels"], "ignore": ignore}
        dataset_json["numTraining"] = len(set(supports) | set(val_cases)) + len(pseudo)
        dataset_json["description"] = description
        write_dataset_json(staging, dataset_json)
    return target_raw.parent / f"Dataset{out_id:03d}_{name}"


def copy_plans(target_pre: Path, out_pre: Path, plans_name: str, out_name: str) -> dict:
    """The target's plans (and fingerprint) for the new dataset, so nnU-Net preprocesses it identically."""
    plans_file = target_pre / f"{plans_name}.json"
    plans = read_json(plans_file, f"preprocess the target first (nnUNetv2_fseft_prepare_target), or pass its "
                                  f"plans name with -p")
    out_pre.mkdir(parents=True, exist_ok=True)
    plans["dataset_name"] = out_name
    write_json(out_pre / f"{plans_name}.json", plans)
    fingerprint = target_pre / "dataset_fingerprint.json"
    if fingerprint.is_file():
        shutil.copy2(fingerprint, out_pre / "dataset_fingerprint.json")
    return plans


def write_split(out_pre: Path, supports: Sequence[str], pseudo_ids: Sequence[str], val_cases: Sequence[str]) -> dict:
    """splits_final.json with one fold (0): supports repeated (see the module's docstring), pseudo cases, val."""
    repeats = support_repeats(len(supports), len(pseudo_ids))
    train: List[str] = [c for c in supports for _ in range(repeats)] + [f"{PSEUDO_PREFIX}{c}" for c in pseudo_ids]
    split = [{"train": train, "val": list(val_cases)}]
    write_json(out_pre / "splits_final.json", split)
    return {"support_repeats": repeats, "n_train_entries": len(train)}
