"""Stage `teacher@<dataset>`: the frozen unimodal teacher that SUMMER distils from.

The `teacher.model` of params trained on `teacher.modality` alone (one seed, selected on validation like
every run, tracked in MLflow with tag role=teacher); its checkpoint directory is the stage's output.

    python pipelines/teacher.py meld --out runs/teacher/meld
"""

import argparse

from erc.io import check_writable
from erc.params import load_params, stage_main
from erc.training.config import configs_from_params, teacher_settings
from erc.training.driver import run


@stage_main
def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dataset")
    parser.add_argument("--out", required=True)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. --set train.num_workers=4 --set data_dir=/mnt/erc/data")
    args = parser.parse_args()
    check_writable(args.out, folder=True)

    params = load_params(args.params, args.set)
    teacher = teacher_settings(params, source=args.params)
    (cfg,) = configs_from_params(params, args.dataset, teacher.model, source=args.params, seeds=[teacher.seed],
                                 modalities=[teacher.modality])
    result = run(cfg, tags={"role": "teacher"}, export_checkpoint=args.out)
    print(f"teacher {args.dataset}: {teacher.model} on {teacher.modality}, "
          f"validation wF1 {result['selected_val_wf1']:.2f}, run {result['run_id']}")


if __name__ == "__main__":
    main()
