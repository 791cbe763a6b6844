"""The FSEFT trainers: each is a declaration of a PEFT method and its learning rate (AdamW), plus the stock nnU-Net
baselines on the same schedule. Learning rates follow the FSEFT study (MedIA 2025).

Declared here, in the library; `trainers/fseft_trainers.py` (the folder nnUNet_extTrainer points at) re-exports
them, so the library never imports that folder and nnU-Net finds these very classes by name."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .fseft_trainer import FSEFTTrainer
from .schedule import apply_schedule, seed_from_environment

__all__ = ["FSEFTFullFTTrainer", "FSEFTFTLastTrainer", "FSEFTDecoderTrainer", "FSEFTLinearProbeTrainer",
           "FSEFTSpatialAdapterTrainer", "FSEFTBitFitTrainer", "FSEFTAffineNormTrainer", "FSEFTCNNAdapterTrainer",
           "FSEFTAdaptFormerTrainer", "FSEFTLoRATrainer", "FSEFTDecoderLoRATrainer", "FSEFTDecoderBitFitTrainer",
           "FSEFTDecoderAdaptFormerTrainer", "FSEFTDecoderAffineNormTrainer", "FSEFTScratchTrainer",
           "FSEFTnnUNetFTTrainer", "FSEFTLinearProbeNoCacheTrainer", "FSEFTSpatialAdapterNoCacheTrainer"]


class FSEFTFullFTTrainer(FSEFTTrainer):
    peft_method, learning_rate = "full", 1e-4


class FSEFTFTLastTrainer(FSEFTTrainer):
    peft_method, learning_rate = "ft_last", 1e-3


class FSEFTDecoderTrainer(FSEFTTrainer):
    peft_method, learning_rate = "decoder", 1e-3


class FSEFTLinearProbeTrainer(FSEFTTrainer):
    peft_method, learning_rate = "linear_probe", 1e-2


class FSEFTSpatialAdapterTrainer(FSEFTTrainer):
    peft_method, learning_rate = "spatial_adapter", 1e-4


class FSEFTBitFitTrainer(FSEFTTrainer):
    peft_method, learning_rate = "bitfit", 1e-2


class FSEFTAffineNormTrainer(FSEFTTrainer):
    peft_method, learning_rate = "affine_norm", 1e-2


class FSEFTCNNAdapterTrainer(FSEFTTrainer):
    peft_method, learning_rate = "cnn_adapter", 1e-2


class FSEFTAdaptFormerTrainer(FSEFTTrainer):
    peft_method, learning_rate = "adaptformer", 1e-2


class FSEFTLoRATrainer(FSEFTTrainer):
    peft_method, learning_rate = "lora", 1e-3


class FSEFTDecoderLoRATrainer(FSEFTTrainer):
    peft_method, learning_rate = "decoder_lora", 1e-3


class FSEFTDecoderBitFitTrainer(FSEFTTrainer):
    peft_method, learning_rate = "decoder_bitfit", 1e-3


class FSEFTDecoderAdaptFormerTrainer(FSEFTTrainer):
    peft_method, learning_rate = "decoder_adaptformer", 1e-3


class FSEFTDecoderAffineNormTrainer(FSEFTTrainer):
    peft_method, learning_rate = "decoder_affine_norm", 1e-3


class FSEFTScratchTrainer(nnUNetTrainer):
    """The from-scratch baseline: stock nnU-Net (SGD, its LR, random init) on the FSEFT schedule."""
    epochs = FSEFTTrainer.epochs
    iterations_per_epoch = FSEFTTrainer.iterations_per_epoch
    val_iterations_per_epoch = FSEFTTrainer.val_iterations_per_epoch
    learning_rate = 1e-2  # nnU-Net's

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self)

    def initialize(self):
        seed_from_environment()
        super().initialize()


class FSEFTnnUNetFTTrainer(FSEFTScratchTrainer):
    """nnU-Net's own fine-tuning as a baseline: stock nnU-Net (SGD 1e-2) on the FSEFT schedule, run with
    `-pretrained_weights`, which loads every layer but the segmentation head (nnU-Net starts that one at random).
    The same class as the from-scratch baseline under its own name, so the two runs get separate result folders."""
    what = "stock nnU-Net, fine-tuned (-pretrained_weights)"


class FSEFTLinearProbeNoCacheTrainer(FSEFTLinearProbeTrainer):
    """The linear probe through the whole frozen network every step (no feature cache), for comparison."""
    use_feature_cache = False


class FSEFTSpatialAdapterNoCacheTrainer(FSEFTSpatialAdapterTrainer):
    """The spatial adapter through the whole frozen network every step (no feature cache), for comparison."""
    use_feature_cache = False
