"""nnUNetv2_fseft_zeroshot: the foundation segments the target's classes with no training (the baseline).

  nnUNetv2_fseft_zeroshot -m FOUNDATION_MODEL_FOLDER -d TARGET [-f FOLD]

Each target class takes the foundation's head channel of the same name. The query cases are the val cases of
fold F in the target's splits_final.json (nnUNetv2_fseft_fewshot_splits makes them the shared query set), or
every labelled case when there is no split. Writes nnUNet_results/DatasetT/FSEFTZeroShot__PLANS__CONFIG/
(an ordinary model folder: nnUNetv2_predict_from_modelfolder runs it) with the predictions and nnU-Net's
summary.json in fold_F/validation/.
"""
import argparse

from ..errors import cli_entry


@cli_entry
def main(argv=None):
    p = argparse.ArgumentParser(prog="nnUNetv2_fseft_zeroshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="the foundation's model folder (TRAINER__PLANS__CONFIG)")
    p.add_argument("-d", "--dataset", required=True, help="target dataset id or name (in nnUNet_raw)")
    p.add_argument("-f", "--fold", type=int, default=0, help="fold of the target's splits whose val cases are scored")
    p.add_argument("--foundation_fold", default="0", help="fold of the foundation to use (default 0)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda", "mps"), help="as nnUNetv2_predict")
    p.add_argument("--overwrite", action="store_true", help="redo an existing zero-shot fold")
    a = p.parse_args(argv)
    from ..zeroshot import build_zeroshot_model, predict_and_evaluate
    model = build_zeroshot_model(a.model, a.dataset, a.fold, a.foundation_fold, a.overwrite)
    print((model / f"fold_{a.fold}" / "zeroshot.log").read_text(), end="")
    summary = predict_and_evaluate(model, a.dataset, a.fold, a.device)
    for label, metrics in summary["mean"].items():
        print(f"class {label}: Dice {metrics['Dice']:.4f}")
    print(f"written: {model / f'fold_{a.fold}' / 'validation' / 'summary.json'}")
