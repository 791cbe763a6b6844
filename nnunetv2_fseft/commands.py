"""Running nnU-Net's own commands from the plugin's: the console script beside this Python, and an environment in
which nnU-Net finds the plugin's trainers."""
import os
import shutil
import sys
from pathlib import Path

from .errors import FSEFTError


def console_script(name: str) -> str:
    """nnU-Net's console script next to this Python (works without an activated venv), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FSEFTError(f"{name} not found next to {sys.executable} or on PATH; install nnunetv2 in this environment")
    return found


def plugin_environment() -> dict:
    """The caller's environment with the plugin's trainers on nnUNet_extTrainer (appended, never replacing)."""
    from .trainer_names import trainers_folder
    env = dict(os.environ)
    folders = [f for f in env.get("nnUNet_extTrainer", "").split(os.pathsep) if f]
    if trainers_folder() not in folders:
        folders.append(trainers_folder())
    env["nnUNet_extTrainer"] = os.pathsep.join(folders)
    return env
