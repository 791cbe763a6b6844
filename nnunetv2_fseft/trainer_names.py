"""The plugin's trainer names: the list a user sees (`nnUNetv2_fseft_ext_path --list`), the check of the names the
plugin's own commands take (benchmark `methods`), and near-miss suggestions (FSEFTLoraTrainer -> FSEFTLoRATrainer).

nnU-Net's own commands resolve `-tr` themselves; what they print for an unknown name is in docs/hardening.md."""
import difflib
import importlib
import importlib.util
import os
import re
from pathlib import Path

from .errors import fail

LIST_HINT = "nnUNetv2_fseft_ext_path --list shows each with its method and learning rate"
# the library modules that declare the shipped trainers; trainers/ (nnunetv2_fseft_trainers) re-exports them
TRAINER_MODULES = ("nnunetv2_fseft.training.fseft_trainers", "nnunetv2_fseft.training.fseft_ti_trainers",
                   "nnunetv2_fseft.training.multitalent")
TRAINERS_PACKAGE = "nnunetv2_fseft_trainers"


def trainers_folder() -> str:
    """The folder of the plugin's trainers (the installed `nnunetv2_fseft_trainers`): what nnUNet_extTrainer names.
    Found without importing it (its name_check module imports this one)."""
    spec = importlib.util.find_spec(TRAINERS_PACKAGE)
    return str(Path(next(iter(spec.submodule_search_locations))).resolve())


def plugin_trainers() -> dict:
    """{name: class} of every shipped trainer (what nnUNet_extTrainer's folder re-exports), sorted by name."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    found = {}
    for module_name in TRAINER_MODULES:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", None) or vars(module):
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainer) and obj.__module__ == module.__name__:
                found.setdefault(name, obj)
    return dict(sorted(found.items()))


def describe(cls) -> tuple:
    """(what it trains, learning rate, optimizer) of a plugin trainer, from its class attributes."""
    from .training.fseft_trainer import FSEFTTrainer
    from .training.multitalent import MultiTalentTrainer
    from .training.transductive import TransductiveMixin
    if issubclass(cls, FSEFTTrainer):
        what = cls.peft_method + (" + size prior (TI)" if issubclass(cls, TransductiveMixin) else "")
        head = cls.head_learning_rate or cls.learning_rate
        what += f", head lr {head:.0e}" if head != cls.learning_rate else ""
        return what + ("" if cls.use_feature_cache else ", no feature cache"), cls.learning_rate, "AdamW"
    if issubclass(cls, MultiTalentTrainer):
        return "partial-label pre-training", cls.learning_rate, "SGD"
    return getattr(cls, "what", "stock nnU-Net"), getattr(cls, "learning_rate", 1e-2), "SGD"  # nnU-Net's 1e-2


def trainer_table() -> str:
    rows = [(name, *describe(cls)) for name, cls in plugin_trainers().items()]
    width = max(len(r[0]) for r in rows)
    what = max(len(r[1]) for r in rows)
    return "\n".join(f"{n:<{width}}  {w:<{what}}  lr {lr:.0e}  {opt}" for n, w, lr, opt in rows)


def suggestions(name: str, known) -> list:
    """Known names close to `name`: the one that differs only in letter case, else up to two near spellings."""
    same = [k for k in known if k.lower() == name.lower() and k != name]
    return same[:1] or difflib.get_close_matches(name, known, n=2, cutoff=0.85)


def unknown_name(kind: str, name: str, known, also: str = "") -> str:
    """One line: the unknown name, the likely intended one, and every valid one (`also`: what else is valid)."""
    near = suggestions(name, known)
    did_you_mean = f"did you mean {' or '.join(near)}? " if near else ""
    return f"unknown {kind} '{name}'; {did_you_mean}valid: {', '.join(known)}{also} ({LIST_HINT})"


def case_only_miss(name: str):
    """The plugin trainer that `name` equals up to letter case (FSEFTLoraTrainer -> FSEFTLoRATrainer), else None."""
    if not re.fullmatch(r"[A-Za-z]\w*", name):
        return None
    trainers = plugin_trainers()
    if name in trainers:
        return None
    return next((t for t in trainers if t.lower() == name.lower()), None)


def _folders_after_ours() -> bool:
    """True when nnUNet_extTrainer names an existing folder after the plugin's: a trainer there may still match."""
    folders = [os.path.realpath(p) for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p.strip()]
    ours = os.path.realpath(trainers_folder())
    return ours in folders and any(os.path.isdir(p) for p in folders[folders.index(ours) + 1:])


def stop_on_case_only_miss(name: str) -> None:
    """Inside nnUNetv2_train's -tr lookup (trainers/name_check.py): a name that differs from a plugin trainer only
    in case ends the command with one line instead of nnU-Net's traceback."""
    if name.startswith("_") or _folders_after_ours():
        return
    intended = case_only_miss(name)
    if intended is not None:
        raise fail(f"unknown trainer '{name}'; did you mean {intended}? (trainer names are case-sensitive; "
                   f"{LIST_HINT})")
