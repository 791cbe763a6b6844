"""nnUNetv2_fseft_assemble: one nnU-Net raw dataset from several, with a unified label space and the
per-case annotated classes (dataset.json "fseft_cases") that partial-label training needs."""
import argparse

from nnunetv2_fseft.data.assemble import assemble_datasets
from nnunetv2_fseft.data.convert import parse_label_spec
from nnunetv2_fseft.errors import cli_entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnUNetv2_fseft_assemble", description=__doc__)
    p.add_argument("-d", "--datasets", nargs="+", required=True, help="source dataset ids or DatasetXXX_Name")
    p.add_argument("-o", "--dataset-id", type=int, required=True, help="id of the assembled dataset (1-999)")
    p.add_argument("-n", "--name", required=True, help="name of the assembled dataset")
    p.add_argument("--synonyms", default=None, metavar="FILE.json",
                   help='{"liver": ["hepar"], ...}: other names that mean the canonical class')
    p.add_argument("--keep-separate", action="store_true",
                   help="never merge classes across datasets; classes become 'DatasetXXX_Name:class'")
    p.add_argument("--contains", nargs="+", default=None, metavar="ORGAN=PART[,PART...]",
                   help="the organ's target includes these structures' voxels, e.g. liver=liver_tumor "
                        "(written as nnU-Net regions)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_NAME")
    return p


@cli_entry
def main(argv=None):
    a = _parser().parse_args(argv)
    contains = parse_label_spec(a.contains, "--contains") if a.contains else None
    assemble_datasets(a.datasets, a.dataset_id, a.name, synonyms=a.synonyms, keep_separate=a.keep_separate,
                      contains=contains, overwrite=a.overwrite)
    return 0


if __name__ == "__main__":
    main()
