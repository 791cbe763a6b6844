"""Tell a foundation file's source and hand it to that source's reader.

An nnssl checkpoint must load with weights_only=True. A file that does not is only unpickled when its pickle
stream (read as data, never executed) looks like an nnU-Net checkpoint, which is a pickle by design."""
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import torch

from ..errors import FSEFTError
from .description import Foundation
from .nnssl import PLAN_KEY, read_nnssl
from .nnunet import folder_checkpoint, read_nnunet

NEITHER = (f"is not an nnU-Net checkpoint (no 'network_weights') nor an nnssl checkpoint (no '{PLAN_KEY}'); pass "
           "a checkpoint_final.pth written by nnUNetv2_train, its model folder, or an nnssl checkpoint")


def read_foundation(path) -> Foundation:
    path = Path(path)
    if path.is_dir():
        if not (path / "plans.json").is_file() or not (path / "dataset.json").is_file():
            raise FSEFTError(f"{path} is not an nnU-Net model folder (no plans.json / dataset.json); pass "
                             "nnUNet_results/DatasetX/TRAINER__PLANS__CONFIG or a checkpoint .pth")
        checkpoint_file = folder_checkpoint(path)
        return read_nnunet(checkpoint_file, _nnunet_checkpoint(checkpoint_file), folder=path)
    if not path.is_file():
        raise FSEFTError(f"foundation checkpoint {path} does not exist; pass the foundation's "
                         "fold_X/checkpoint_final.pth with -pretrained_weights")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not zipfile.is_zipfile(path):
            raise _unreadable(path, e) from None
        return _read_pickled(path, str(e))
    except Exception as e:  # not a torch file at all: say which and why, not a traceback
        raise _unreadable(path, e) from None
    if isinstance(checkpoint, dict) and PLAN_KEY in checkpoint:
        return read_nnssl(path, checkpoint)
    if _is_nnunet(checkpoint):
        return read_nnunet(path, checkpoint)
    raise FSEFTError(f"{path} {NEITHER}")


def _unreadable(path: Path, error: Exception) -> FSEFTError:
    why = "not a torch zip archive" if not zipfile.is_zipfile(path) else str(error).splitlines()[0][:120]
    return FSEFTError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {why}); pass a "
                      "checkpoint_final.pth written by nnUNetv2_train, its model folder, or an nnssl checkpoint")


def _is_nnunet(checkpoint) -> bool:
    return isinstance(checkpoint, dict) and isinstance(checkpoint.get("network_weights"), dict)


def _read_pickled(path: Path, error: str) -> Foundation:
    strings = _pickle_strings(path)
    if PLAN_KEY in strings:
        found = re.search(r"GLOBAL ([\w.]+)", error)
        what = f" ({found.group(1)})" if found else ""
        raise FSEFTError(f"{path} looks like an nnssl checkpoint but needs unpickling code{what}, and nnssl "
                         "checkpoints load with weights_only=True; nothing was unpickled: get the file again from "
                         "its source, or re-save it with plain tensors, lists and dicts only")
    if "network_weights" in strings:
        return read_nnunet(path, _nnunet_checkpoint(path))
    raise FSEFTError(f"{path} {NEITHER} (it also needs unpickling code, which was not run)")


def _nnunet_checkpoint(path: Path) -> dict:
    """nnU-Net checkpoints are pickles (init_args, logs): only load ones you trust. The trainer class they name
    is a string here, so it need not be importable."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise _unreadable(path, e) from None
    if not _is_nnunet(checkpoint):
        raise FSEFTError(f"{path} {NEITHER}")
    return checkpoint


def _pickle_strings(path: Path) -> set:
    """The strings of a torch file's pickle stream, read by pickletools (which executes nothing)."""
    try:
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            data = archive.read(name)
        return {arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)}
    except Exception:  # not a zip-format torch file, or a damaged stream: nothing recognisable
        return set()
