"""The transductive (TI) FSEFT trainers: each FSEFT trainer plus the organ-size prior on the unlabelled query set,
L = L_seg(supports) + lambda * L_TI (see nnunetv2_fseft/training/transductive.py and docs/transductive.md).

Same method and learning rate as the FSEFT trainer named without `TI`. nnU-Net finds these through
nnUNet_extTrainer=$(nnUNetv2_fseft_ext_path) and imports this module under a top-level name: absolute imports only.
Change lambda, gamma or the warm-up with a subclass, e.g.

    class FSEFTLoRATITrainer_lambda1(FSEFTLoRATITrainer):
        ti_lambda, ti_warmup_epochs = 1.0, 5
"""
from nnunetv2_fseft.training.transductive import TransductiveMixin
from nnunetv2_fseft_trainers.fseft_trainers import (
    FSEFTAdaptFormerTrainer, FSEFTAffineNormTrainer, FSEFTBitFitTrainer, FSEFTCNNAdapterTrainer,
    FSEFTDecoderAdaptFormerTrainer, FSEFTDecoderAffineNormTrainer, FSEFTDecoderBitFitTrainer, FSEFTDecoderLoRATrainer,
    FSEFTDecoderTrainer, FSEFTFTLastTrainer, FSEFTFullFTTrainer, FSEFTLinearProbeTrainer, FSEFTLoRATrainer,
    FSEFTSpatialAdapterTrainer)


class FSEFTFullFTTITrainer(TransductiveMixin, FSEFTFullFTTrainer):
    pass


class FSEFTFTLastTITrainer(TransductiveMixin, FSEFTFTLastTrainer):
    pass


class FSEFTDecoderTITrainer(TransductiveMixin, FSEFTDecoderTrainer):
    pass


class FSEFTLinearProbeTITrainer(TransductiveMixin, FSEFTLinearProbeTrainer):
    pass


class FSEFTSpatialAdapterTITrainer(TransductiveMixin, FSEFTSpatialAdapterTrainer):
    pass


class FSEFTBitFitTITrainer(TransductiveMixin, FSEFTBitFitTrainer):
    pass


class FSEFTAffineNormTITrainer(TransductiveMixin, FSEFTAffineNormTrainer):
    pass


class FSEFTCNNAdapterTITrainer(TransductiveMixin, FSEFTCNNAdapterTrainer):
    pass


class FSEFTAdaptFormerTITrainer(TransductiveMixin, FSEFTAdaptFormerTrainer):
    pass


class FSEFTLoRATITrainer(TransductiveMixin, FSEFTLoRATrainer):
    pass


class FSEFTDecoderLoRATITrainer(TransductiveMixin, FSEFTDecoderLoRATrainer):
    pass


class FSEFTDecoderBitFitTITrainer(TransductiveMixin, FSEFTDecoderBitFitTrainer):
    pass


class FSEFTDecoderAdaptFormerTITrainer(TransductiveMixin, FSEFTDecoderAdaptFormerTrainer):
    pass


class FSEFTDecoderAffineNormTITrainer(TransductiveMixin, FSEFTDecoderAffineNormTrainer):
    pass
