"""The transductive (TI) FSEFT trainers: each FSEFT trainer plus the organ-size prior on the unlabelled query set,
L = L_seg(supports) + lambda * L_TI (see nnunetv2_fseft/training/transductive.py and docs/transductive.md).

Same method and learning rate as the FSEFT trainer named without `TI`. Declared here, in the library;
`trainers/fseft_ti_trainers.py` re-exports them for nnUNet_extTrainer.
Change lambda, gamma or the warm-up with a subclass, e.g.

    class FSEFTLoRATITrainer_lambda1(FSEFTLoRATITrainer):
        ti_lambda, ti_warmup_epochs = 1.0, 5
"""
from .fseft_trainers import (
    FSEFTAdaptFormerTrainer, FSEFTAffineNormTrainer, FSEFTBitFitTrainer, FSEFTCNNAdapterTrainer,
    FSEFTDecoderAdaptFormerTrainer, FSEFTDecoderAffineNormTrainer, FSEFTDecoderBitFitTrainer, FSEFTDecoderLoRATrainer,
    FSEFTDecoderTrainer, FSEFTFTLastTrainer, FSEFTFullFTTrainer, FSEFTLinearProbeTrainer, FSEFTLoRATrainer,
    FSEFTSpatialAdapterTrainer)
from .transductive import TransductiveMixin

__all__ = ["FSEFTFullFTTITrainer", "FSEFTFTLastTITrainer", "FSEFTDecoderTITrainer", "FSEFTLinearProbeTITrainer",
           "FSEFTSpatialAdapterTITrainer", "FSEFTBitFitTITrainer", "FSEFTAffineNormTITrainer",
           "FSEFTCNNAdapterTITrainer", "FSEFTAdaptFormerTITrainer", "FSEFTLoRATITrainer",
           "FSEFTDecoderLoRATITrainer", "FSEFTDecoderBitFitTITrainer", "FSEFTDecoderAdaptFormerTITrainer",
           "FSEFTDecoderAffineNormTITrainer"]


class FSEFTFullFTTITrainer(TransductiveMixin, FSEFTFullFTTrainer):
    """FSEFTFullFTTrainer with the size prior on the query images."""


class FSEFTFTLastTITrainer(TransductiveMixin, FSEFTFTLastTrainer):
    """FSEFTFTLastTrainer with the size prior on the query images."""


class FSEFTDecoderTITrainer(TransductiveMixin, FSEFTDecoderTrainer):
    """FSEFTDecoderTrainer with the size prior on the query images."""


class FSEFTLinearProbeTITrainer(TransductiveMixin, FSEFTLinearProbeTrainer):
    """FSEFTLinearProbeTrainer with the size prior on the query images."""


class FSEFTSpatialAdapterTITrainer(TransductiveMixin, FSEFTSpatialAdapterTrainer):
    """FSEFTSpatialAdapterTrainer with the size prior on the query images."""


class FSEFTBitFitTITrainer(TransductiveMixin, FSEFTBitFitTrainer):
    """FSEFTBitFitTrainer with the size prior on the query images."""


class FSEFTAffineNormTITrainer(TransductiveMixin, FSEFTAffineNormTrainer):
    """FSEFTAffineNormTrainer with the size prior on the query images."""


class FSEFTCNNAdapterTITrainer(TransductiveMixin, FSEFTCNNAdapterTrainer):
    """FSEFTCNNAdapterTrainer with the size prior on the query images."""


class FSEFTAdaptFormerTITrainer(TransductiveMixin, FSEFTAdaptFormerTrainer):
    """FSEFTAdaptFormerTrainer with the size prior on the query images."""


class FSEFTLoRATITrainer(TransductiveMixin, FSEFTLoRATrainer):
    """FSEFTLoRATrainer with the size prior on the query images."""


class FSEFTDecoderLoRATITrainer(TransductiveMixin, FSEFTDecoderLoRATrainer):
    """FSEFTDecoderLoRATrainer with the size prior on the query images."""


class FSEFTDecoderBitFitTITrainer(TransductiveMixin, FSEFTDecoderBitFitTrainer):
    """FSEFTDecoderBitFitTrainer with the size prior on the query images."""


class FSEFTDecoderAdaptFormerTITrainer(TransductiveMixin, FSEFTDecoderAdaptFormerTrainer):
    """FSEFTDecoderAdaptFormerTrainer with the size prior on the query images."""


class FSEFTDecoderAffineNormTITrainer(TransductiveMixin, FSEFTDecoderAffineNormTrainer):
    """FSEFTDecoderAffineNormTrainer with the size prior on the query images."""
