"""The FSEFT trainers: each is a declaration of a PEFT method and its learning rate (AdamW).

nnU-Net finds these through nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path); it imports this module under
a top-level name, so imports here must be absolute. Learning rates follow the FSEFT study (MedIA 2025).
"""
from nnunetv2_fseft.training.fseft_trainer import FSEFTTrainer


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

