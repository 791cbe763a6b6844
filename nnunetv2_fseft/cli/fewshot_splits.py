"""nnUNetv2_fseft_fewshot_splits: K-shot support sets + one fixed query set as nnU-Net folds."""
import argparse

from nnunetv2_fseft.data.fewshot import TABLE_FILE, format_fold_table, write_fewshot_splits
from nnunetv2_fseft.errors import cli_entry


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_fseft_fewshot_splits",
        description="Write $nnUNet_preprocessed/DatasetXXX/splits_final.json so that each nnU-Net fold is one "
                    "(K, seed) few-shot experiment: train = K support cases, val = one query set shared by all "
                    f"folds. The fold table is also saved as {TABLE_FILE}.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset ID or DatasetXXX_Name")
    p.add_argument("-k", dest="ks", type=int, nargs="+", required=True, help="shot counts, e.g. 1 5 10")
    p.add_argument("--seeds", type=int, default=3, help="number of support draws per K, seeds 0..N-1 (default 3)")
    p.add_argument("--query", type=int, default=None, help="number of query cases, drawn once with a fixed seed")
    p.add_argument("--query-file", default=None,
                   help="JSON list of query case ids (pins the query set, e.g. for benchmarks)")
    p.add_argument("--target-class", default=None,
                   help="the class the folds are for: a support lacking it is an error (default: warn about "
                        "supports lacking any foreground class)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a splits_final.json not written by this tool (a backup copy is kept)")
    return p


@cli_entry
def main(argv=None):
    a = _parser().parse_args(argv)
    result = write_fewshot_splits(a.dataset, a.ks, a.seeds, n_query=a.query, query_file=a.query_file,
                                  target_class=a.target_class, overwrite=a.overwrite)
    print(format_fold_table(result))
    print(f"wrote {result['splits_file']} ({len(result['folds'])} folds) and {TABLE_FILE}; "
          f"train one with: nnUNetv2_train {result['dataset']} 3d_fullres FOLD ...")
    return 0


if __name__ == "__main__":
    main()
