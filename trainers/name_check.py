"""`nnUNetv2_train ... -tr FSEFTLoraTrainer`: one line naming FSEFTLoRATrainer instead of nnU-Net's traceback.

nnU-Net finds an external trainer by importing each module of this folder and asking hasattr(module, NAME). This
module has no trainers; its module-level __getattr__ (PEP 562) answers that question only for a name that equals
a plugin trainer up to letter case, by ending the command with the plugin's one-line error. Every other name, and
any folder listed after this one in nnUNet_extTrainer, is left to nnU-Net (nnunetv2_fseft/trainer_names.py)."""
from nnunetv2_fseft.trainer_names import stop_on_case_only_miss


def __getattr__(name):
    stop_on_case_only_miss(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
