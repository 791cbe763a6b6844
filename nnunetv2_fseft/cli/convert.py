"""nnUNetv2_fseft_convert: make an nnU-Net raw dataset from per-structure masks (`structures`) or from
another raw dataset with a subset / renaming / merging of its labels (`relabel`)."""
import argparse

from nnunetv2_fseft.data.convert import convert_structures, parse_label_spec, relabel_dataset
from nnunetv2_fseft.errors import cli_entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_fseft_convert", description=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)

    s = sub.add_parser("structures", help="CASE/ct.nii.gz + CASE/segmentations/<structure>.nii.gz -> raw dataset",
                       description="Each INPUT is a case folder or a folder of case folders (TotalSegmentator "
                                   "layout). Writes $nnUNet_raw/DatasetXXX_NAME; images are linked.")
    s.add_argument("inputs", nargs="+", metavar="INPUT")
    s.add_argument("--structures", nargs="+", default=None,
                   help="structures to keep, in label order (default: all non-empty in at least one case)")
    s.add_argument("--priority", nargs="+", default=None,
                   help="who wins where masks overlap, highest first (overlaps are errors otherwise)")

    r = sub.add_parser("relabel", help="raw dataset -> raw dataset with a subset/renaming/merging of labels",
                       description="Images are linked, label maps remapped; unlisted labels become background.")
    r.add_argument("-i", "--input", required=True, help="source dataset id or DatasetXXX_Name (in nnUNet_raw)")
    r.add_argument("--labels", nargs="+", required=True, metavar="NEW=OLD[,OLD...]",
                   help="e.g. liver=liver,liver_tumor kidney=kidney_left,kidney_right (or spleen=spleen)")

    for q in (s, r):
        q.add_argument("-o", "--dataset-id", type=int, required=True, help="id of the new dataset (1-999)")
        q.add_argument("-n", "--name", required=True, help="name of the new dataset (DatasetXXX_NAME)")
        q.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME")
    return p


@cli_entry
def main(argv=None):
    a = _parser().parse_args(argv)
    if a.mode == "structures":
        convert_structures(a.inputs, a.dataset_id, a.name, a.structures, a.priority, a.overwrite)
    else:
        relabel_dataset(a.input, a.dataset_id, a.name, parse_label_spec(a.labels), a.overwrite)
    return 0


if __name__ == "__main__":
    main()
