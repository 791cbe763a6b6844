"""nnUNetv2_fseft_export: share an adapted model.

  nnUNetv2_fseft_export MODEL_FOLDER OUT_FOLDER --merge     stock nnU-Net model folder (no plugin needed)
  nnUNetv2_fseft_export MODEL_FOLDER OUT_FOLDER             adapter files + pointer to the foundation
  nnUNetv2_fseft_export --apply ADAPTER_FOLDER FOUNDATION OUT_FOLDER [--merge]
                                                            rebuild a full model folder from adapter files

FOUNDATION: the one the adapter was trained from: an nnU-Net model folder, its fold_X/checkpoint_final.pth, or an
nnssl checkpoint (.pth); it is recognised by its network-weights sha256, recorded in adapter.json.
"""
import argparse

from ..errors import FSEFTError, cli_entry
from ..export import apply_adapter, export_model


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="MODEL_FOLDER OUT_FOLDER, or with --apply: "
                                            "ADAPTER_FOLDER FOUNDATION OUT_FOLDER")
    p.add_argument("--merge", action="store_true", help="fold LoRA / parallel adapters into the convolutions")
    p.add_argument("--apply", action="store_true", help="rebuild a model folder from adapter files")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a = p.parse_args(argv)
    expected = 3 if a.apply else 2
    if len(a.paths) != expected:
        raise FSEFTError(f"expected {expected} paths, got {len(a.paths)}; see nnUNetv2_fseft_export -h")
    if a.apply:
        out = apply_adapter(*a.paths, merge=a.merge, overwrite=a.overwrite)
    else:
        out = export_model(*a.paths, merge=a.merge, overwrite=a.overwrite)
    print(f"written: {out}")
