"""What a demo run does: the methods, the synthetic story's datasets, the schedule and sizes."""
from dataclasses import dataclass
from typing import Optional, Tuple

PLANS, CONFIGURATION, PRESET = "nnUNetPlans", "3d_fullres", "tiny"
FOUNDATION_FOLD = 0  # nnU-Net's 5-fold split: the foundation's final validation scores held-out cases

# (display name, trainer); the schedule suffix (_demo / _demoquick) is added per run
METHODS = (
    ("linear probe", "FSEFTLinearProbeTrainer"),
    ("decoder + encoder LoRA", "FSEFTDecoderLoRATrainer"),
    ("LoRA", "FSEFTLoRATrainer"),
    ("full fine-tuning", "FSEFTFullFTTrainer"),
)
SCRATCH = ("from scratch (nnU-Net)", "nnUNetTrainer")
DEFAULT_METHODS = ("FSEFTLinearProbeTrainer", "FSEFTDecoderLoRATrainer", "FSEFTFullFTTrainer")
QUICK_METHODS = ("FSEFTLinearProbeTrainer", "FSEFTDecoderLoRATrainer")

# the synthetic story: (id, name, annotated organs, seed, organ intensity shift in HU)
SOURCES = ((501, "PhantomLiverSpleen", ("liver", "spleen"), 1, 0.0),
           (502, "PhantomLiverKidneys", ("liver", "kidney_left", "kidney_right"), 2, 0.0))
FOUNDATION = (510, "PhantomFoundation")
TARGET = (520, "PhantomScannerB", ("liver", "pancreas"), 3, 40.0)


@dataclass(frozen=True)
class Settings:
    """What a demo run does; stored in the work dir's marker so that a resumed run does the same."""
    schedule: str                   # suffix of the trainers in nnunetv2_fseft/demo_trainers
    n_source_cases: int             # per foundation dataset (synthetic)
    n_target_cases: int             # synthetic target
    n_query: int                    # query cases: the val set of every few-shot fold, never trained on
    ks: Tuple[int, ...]
    trainers: Tuple[str, ...]       # FSEFT trainers (base names)
    scratch: bool                   # also a stock nnU-Net baseline from random init
    data: Optional[Tuple[Tuple[int, ...], int]] = None  # (foundation ids, target id) of the user's datasets
    preset: str = PRESET
    phantom_shape: Tuple[int, ...] = (24, 24, 24)  # voxels per synthetic case (nnU-Net plans the whole case as a patch)


def default_settings(quick: bool = False, data=None, preset: str = PRESET) -> Settings:
    if quick:
        return Settings("demoquick", 6, 8, 3, (1, 5), QUICK_METHODS, True, data, preset)
    return Settings("demo", 12, 11, 6, (1, 5), DEFAULT_METHODS, True, data, preset)
