"""CT-like images synthesised from real label maps (the abdominal benchmark's data: real anatomy, synthetic
intensities); part of the benchmark, not of the installed plugin. Needs torchio, an optional extra:
pip install -e ".[abdomen]".

    priors.py   the HU priors per tissue and scanner domain (JSON), checked; no torch
    anatomy.py  label map -> tissue map: body, fat, muscle wall, spine, stomach lumen, bowel-like distractors; no torch
    ct.py       tissue map -> CT image with torchio (labels to image, blur, resampling, bias field, noise)
"""
from nnunetv2_fseft.errors import FSEFTError

INSTALL_HINT = 'pip install -e ".[abdomen]"'


def require_torchio():
    """torchio, imported only where an image is synthesised, so the plugin itself never needs it."""
    try:
        import torchio
    except ImportError:
        raise FSEFTError(f"synthesising CT images needs torchio, an optional extra; install it with {INSTALL_HINT} "
                         "(or pip install torchio)") from None
    return torchio
