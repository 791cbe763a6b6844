"""File helpers every room uses (no torch here): atomic writes, sha256, and JSON read with one clear line.

Below checkpoints.py and foundations/, so a reader never imports the adapter-file code above it."""
import hashlib
import json
import os
from pathlib import Path

from .errors import FSEFTError


def atomic_write(path, write) -> None:
    """Call write(tmp_path) then rename onto `path` (atomic on POSIX): an interrupted write never leaves half a file."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj) -> None:
    """JSON written atomically, indented as nnU-Net writes its own."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    atomic_write(path, write)


def read_json(path, fix: str = "restore it from its source"):
    """The parsed JSON file; a missing or broken file is one line naming it and `fix`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FSEFTError(f"{path} does not exist; {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise FSEFTError(f"{path} is not valid JSON ({e}); {fix}") from None


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
