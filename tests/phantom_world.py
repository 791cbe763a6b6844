"""A tiny foundation and a target for end-to-end tests: phantoms -> tiny plans -> short stock pre-training."""
from pathlib import Path

import torch

from nnunetv2_fseft.planning import plan_with_preset
from nnunetv2_fseft.synthetic import write_phantom_dataset

PRETRAIN_TRAINER = "nnUNetTrainer_fseft_pretrain"


def model_folder(root, dataset: str, trainer: str) -> Path:
    return Path(root) / "res" / dataset / f"{trainer}__nnUNetPlans__3d_fullres"


def foundation_and_target(root, found_id: int, target_id: int, prefix: str = "") -> Path:
    """Dataset{found_id}_{prefix}Found (liver, spleen; pre-trained) and Dataset{target_id}_{prefix}Target
    (spleen, pancreas; another 'scanner': +20 HU). Returns the foundation's model folder."""
    from nnunetv2.run.run_training import run_training
    raw = Path(root) / "raw"
    write_phantom_dataset(raw, found_id, f"{prefix}Found", ["liver", "spleen"], 6, shape=(24, 24, 24), seed=0)
    write_phantom_dataset(raw, target_id, f"{prefix}Target", ["spleen", "pancreas"], 6, shape=(24, 24, 24), seed=1,
                          intensity_shift=20)
    plan_with_preset(found_id, "tiny", num_processes=1)
    run_training(str(found_id), "3d_fullres", 0, PRETRAIN_TRAINER, device=torch.device("cpu"))
    return model_folder(root, f"Dataset{found_id:03d}_{prefix}Found", PRETRAIN_TRAINER)
