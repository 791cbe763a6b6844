"""Stock nnU-Net schedules used by the benchmarks (found via nnUNet_extTrainer)."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_20x50(nnUNetTrainer):
    """1,000 iterations: the FSEFT default budget, for pre-training on CPU and the from-scratch baseline."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 20
        self.num_iterations_per_epoch = 50
        self.num_val_iterations_per_epoch = 10
