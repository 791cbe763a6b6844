"""The unlabelled images a user brings: nnU-Net's file naming (CASE_0000.nii.gz, one file per channel), checked
up front so that every refusal is one line before anything is written. No torch here."""
import re
from pathlib import Path
from typing import Dict, List

from ..data.nnunet_raw import Geometry
from ..errors import FSEFTError

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def unlabelled_cases(folder, file_ending: str, channel_names: dict) -> Dict[str, List[Path]]:
    """case id -> image files in channel order, checked: the folder holds images, every case has the target's
    channels, every header is readable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FSEFTError(f"unlabelled images: {folder} is not a folder; fix: pass the folder that holds CASE_0000"
                         f"{file_ending} files (nnU-Net's naming, like imagesTs)")
    found: Dict[str, Dict[int, Path]] = {}
    for path in sorted(folder.iterdir()):
        if not path.name.endswith(file_ending) or path.name.startswith("."):
            continue
        m = _CHANNEL.match(path.name[: -len(file_ending)])
        if m:
            found.setdefault(m["case"], {})[int(m["channel"])] = path
    if not found:
        raise FSEFTError(f"unlabelled images: no CASE_0000{file_ending} files in {folder}; fix: name them as "
                         f"nnU-Net does (one file per channel, CASE_XXXX{file_ending}, the target's file_ending)")
    n = len(channel_names)
    for case, channels in found.items():
        if sorted(channels) != list(range(n)):
            have = ", ".join(f"{c:04d}" for c in sorted(channels))
            raise FSEFTError(f"unlabelled image '{case}' has channels {have} but the target has {n} "
                             f"({', '.join(map(str, channel_names.values()))}); fix: give every case the target's "
                             f"channels, as CASE_0000{file_ending} ... CASE_{n - 1:04d}{file_ending}")
    cases = {case: [channels[c] for c in range(n)] for case, channels in found.items()}
    for files in cases.values():
        for f in files:
            Geometry.of_file(f)  # one line naming an unreadable or empty file
    return cases
