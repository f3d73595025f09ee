"""The ``capsmed`` command: one sub-command per pipeline stage, thin over the package.

Every Snakemake rule is one of these calls, so any stage can be run by hand::

    capsmed validate PATH
    capsmed validate -c config/config.yaml
    capsmed prepare    -c config/config.yaml -d demo_seg3d
    capsmed preprocess -c config/config.yaml -d demo_seg3d
    capsmed split      -c config/config.yaml -d demo_seg3d
    capsmed train      -c config/config.yaml -d demo_seg3d -m capsunet
    capsmed evaluate   -c config/config.yaml -d demo_seg3d -m capsunet -s test
    capsmed train      -c config/config.yaml -d demo_seg3d -m capsunet --fraction 0.5   (learning curve)
    capsmed evaluate   -c config/config.yaml -d demo_seg3d -m capsunet -s test --fraction 0.5
    capsmed crossval   -c config/config.yaml -d DATASET -m capsunet   (datasets with split.folds > 1)
    capsmed evaluate-shift -c config/config.yaml -d demo_seg3d -m capsunet --shift rotation
    capsmed generalisation -c config/config.yaml -d demo_seg3d
    capsmed report     -c config/config.yaml -d demo_seg3d -m capsunet -s test
    capsmed report-studies -c config/config.yaml -d demo_seg3d -m capsunet
    capsmed report-dataset -c config/config.yaml -d demo_seg3d
    capsmed summarize  -c config/config.yaml
    capsmed predict --model results/demo_seg3d/models/capsunet/best.pt STUDY.nii.gz ...
    capsmed predict --model best.pt --dicomweb URL --study UID [--series UID] --store
    capsmed models

Bad input ends with one line per problem on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from capsmed import __version__
from capsmed.errors import CapsmedError

logger = logging.getLogger("capsmed")


def _setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose >= 0 else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("matplotlib", "PIL", "numba", "monai.data.nvimgcodec_pydicom_plugin"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _config(args: argparse.Namespace) -> dict:
    from capsmed.config import load_config

    return load_config(args.config, args.set)


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a dataset, or a config and every dataset it names, without changing anything."""
    from capsmed.data.validate import validate_dataset_config, validate_path

    if (args.path is None) == (args.config is None):
        raise CapsmedError("validate: give a dataset PATH or a config with -c CONFIG (not both)")
    if args.config is not None:
        from capsmed.config import load_config
        from capsmed.models.registry import config_problems

        cfg = load_config(args.config, args.set)
        problems = config_problems(cfg, str(args.config))
        if not problems:
            for name, ds in cfg["datasets"].items():
                problems += [f"datasets.{name}: {line}" for line in validate_dataset_config(ds)]
        what = args.config
    else:
        problems = validate_path(Path(args.path))
        what = args.path
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print(f"{what}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{what}: OK")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Validate a dataset source and write its case list."""
    from capsmed.config import dataset_config
    from capsmed.data.sources import prepare_dataset
    from capsmed.paths import Layout

    cfg = _config(args)
    layout = Layout(Path(cfg["results"]))
    doc = prepare_dataset(dataset_config(cfg, args.dataset), layout.data_dir(args.dataset),
                          int(cfg["seed"]))
    logger.info("%s: %d cases ready in %s", args.dataset, len(doc["cases"]),
                layout.cases(args.dataset))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    """Fingerprint the dataset and write the preprocessing plan."""
    from capsmed.config import dataset_config, model_class
    from capsmed.data.fingerprint import compute_fingerprint, make_plan
    from capsmed.infer.runtime import atomic_write_json
    from capsmed.models import MODEL_REGISTRY
    from capsmed.paths import Layout, read_json

    cfg = _config(args)
    ds_cfg = dataset_config(cfg, args.dataset)
    layout = Layout(Path(cfg["results"]))
    cases_doc = read_json(layout.cases(args.dataset), "case list")
    divisible = 1
    for entry in ds_cfg["models"]:
        name = model_class(cfg, entry)
        if name not in MODEL_REGISTRY:
            raise CapsmedError(f"datasets.{args.dataset}.models: unknown model {name!r}; known: "
                               f"{', '.join(sorted(MODEL_REGISTRY))}")
        divisible = max(divisible, int(getattr(MODEL_REGISTRY[name], "size_divisible", 1)))
    fixed = None
    if ds_cfg["task"] == "classification":
        fixed = int(ds_cfg["preprocess"].get("image_size") or 28)
    fingerprint = compute_fingerprint(cases_doc)
    plan = make_plan(fingerprint, ds_cfg, divisible, fixed)
    atomic_write_json(layout.fingerprint(args.dataset), fingerprint)
    atomic_write_json(layout.plan(args.dataset), plan)
    logger.info("%s: plan %s", args.dataset, plan)
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    """Write (once) the train / val / test split."""
    from capsmed.config import dataset_config
    from capsmed.data.splits import load_or_create_splits
    from capsmed.paths import Layout, read_json

    cfg = _config(args)
    ds_cfg = dataset_config(cfg, args.dataset)
    layout = Layout(Path(cfg["results"]))
    cases_doc = read_json(layout.cases(args.dataset), "case list")
    splits = load_or_create_splits(layout.splits(args.dataset), cases_doc, ds_cfg["split"],
                                   int(cfg["seed"]))
    logger.info("%s: %d test cases, %d fold(s)", args.dataset, len(splits["test"]),
                len(splits["folds"]))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) one model on one dataset."""
    from capsmed.infer.settings import config_settings, record_settings
    from capsmed.train.loop import train_model, trained_model_dir

    cfg = _config(args)
    train_model(cfg, args.dataset, args.model, threads=args.threads, max_epochs=args.max_epochs,
                fold=args.fold, fraction=args.fraction)
    # the inference settings beside best.pt, so capsmed predict finds them from the model alone
    record_settings(trained_model_dir(cfg, args.dataset, args.model, args.fold, args.fraction),
                    config_settings(cfg, args.dataset))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate one model on one dataset stage."""
    from capsmed.evaluate.run import evaluate_stage

    cfg = _config(args)
    evaluate_stage(cfg, args.dataset, args.model, args.stage, threads=args.threads, fold=args.fold,
                   case=args.case, from_cases=args.from_cases, fraction=args.fraction)
    return 0


def cmd_evaluate_shift(args: argparse.Namespace) -> int:
    """Evaluate one model on the test cases under one shift, at each severity."""
    from capsmed.evaluate.shift import evaluate_shift

    cfg = _config(args)
    evaluate_shift(cfg, args.dataset, args.model, args.shift, severities=args.severity or None,
                   threads=args.threads, fold=args.fold)
    return 0


def cmd_generalisation(args: argparse.Namespace) -> int:
    """Corruption errors and learning curves of a dataset's models: generalisation.json."""
    from capsmed.evaluate.generalisation import summarise_generalisation
    from capsmed.infer.runtime import atomic_write_json
    from capsmed.paths import Layout

    cfg = _config(args)
    doc = summarise_generalisation(cfg, args.dataset)
    atomic_write_json(Layout(Path(cfg["results"])).generalisation(args.dataset), doc)
    return 0


def cmd_crossval(args: argparse.Namespace) -> int:
    """Gather one model's validation metrics over the folds of a dataset."""
    from capsmed.evaluate.crossval import crossval_summary
    from capsmed.infer.runtime import atomic_write_json
    from capsmed.paths import Layout

    cfg = _config(args)
    doc = crossval_summary(cfg, args.dataset, args.model)
    atomic_write_json(Layout(Path(cfg["results"])).crossval(args.dataset, args.model), doc)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report of one model on one dataset stage."""
    from capsmed import report
    from capsmed.config import path_fold

    cfg = _config(args)
    results = Path(cfg["results"])
    report.write_stage_report(results, args.dataset, args.model, args.stage,
                              fold=path_fold(cfg, args.dataset))
    return 0


def cmd_report_studies(args: argparse.Namespace) -> int:
    """Write one diagnostic report per test study."""
    from capsmed import report
    from capsmed.config import path_fold

    cfg = _config(args)
    pages = report.write_study_reports(Path(cfg["results"]), args.dataset, args.model, stage="test",
                                       fold=path_fold(cfg, args.dataset))
    logger.info("%s/%s: %d study reports", args.dataset, args.model, len(pages))
    return 0


def cmd_report_dataset(args: argparse.Namespace) -> int:
    """Write a dataset's comparison and preprocessing QC pages."""
    from capsmed import report
    from capsmed.config import dataset_config, path_fold

    cfg = _config(args)
    results = Path(cfg["results"])
    report.write_comparison_report(results, args.dataset,
                                   dataset_config(cfg, args.dataset)["models"],
                                   fold=path_fold(cfg, args.dataset))
    report.write_qc_report(results, args.dataset)
    return 0


def cmd_summarize(args: argparse.Namespace) -> int:
    """Write results/summary.json and results/index.html."""
    from capsmed import report
    from capsmed.infer.runtime import atomic_write_json
    from capsmed.paths import Layout
    from capsmed.summary import build_summary

    cfg = _config(args)
    layout = Layout(Path(cfg["results"]))
    summary = build_summary(cfg)
    atomic_write_json(layout.summary, summary)
    report.write_index(layout.results, summary)
    logger.info("wrote %s and %s", layout.summary, layout.index)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Run a trained model on new studies: predictions and a report per study."""
    from capsmed.predict import predict_studies

    studies = [Path(s) for s in args.studies]
    dicom_out, sink = args.dicom_out, None
    if args.dicomweb:
        from capsmed.dicom.web import DicomWeb

        if not args.study:
            raise CapsmedError("--dicomweb needs --study UID")
        server = DicomWeb(args.dicomweb)
        studies += server.fetch_study(args.study, args.series, Path(args.out) / "dicomweb")
        dicom_out = True
        sink = server.store if args.store else None
    elif args.study or args.series or args.store:
        raise CapsmedError("--study, --series and --store need --dicomweb URL")
    if not studies:
        raise CapsmedError("no studies given: name NIfTI files or DICOM series folders, or use "
                           "--dicomweb URL --study UID")
    overrides = {"tta": args.tta, "tta_flips": args.tta_flips, "overlap": args.overlap,
                 "largest_component": args.largest_component, "sw_batch_size": args.sw_batch_size}
    predict_studies(Path(args.model), studies, Path(args.out), device=args.device,
                    overrides=overrides, dicom_out=dicom_out, sink=sink)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the models with their task, output and parameter counts."""
    from capsmed.models import describe_models

    rows = describe_models()
    header = ("name", "task", "output", "params 2D", "params 3D")
    table = [header] + [tuple(str(r.get(k, "")) for k in
                              ("name", "task", "kind", "params_2d", "params_3d"))
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


FOLD_HELP = "cross-validation fold (default: the config's split.fold)"
FRACTION_HELP = ("a learning-curve model: its subset label from train.fractions (e.g. 0.25) or "
                 "train.minority_fraction (minority0.25); folder models/MODEL/fraction-LABEL")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``capsmed``."""
    parser = argparse.ArgumentParser(prog="capsmed", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"capsmed {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    parser.add_argument("--log", help="also append log lines to this file")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(p: argparse.ArgumentParser, dataset: bool = True) -> None:
        p.add_argument("-c", "--config", default="config/config.yaml", help="config YAML")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set train.epochs=2 (repeatable)")
        if dataset:
            p.add_argument("-d", "--dataset", required=True, help="dataset name in the config")

    p = sub.add_parser("validate", help="check a dataset (MSD folder or dataset.json, MedMNIST "
                       ".npz, CSV manifest), or with -c a config and its datasets, without "
                       "changing them")
    p.add_argument("path", nargs="?", default=None)
    p.add_argument("-c", "--config", default=None,
                   help="check this config: schema, model names and options, source paths, "
                        "then each dataset it names")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.set_defaults(func=cmd_validate)

    for name, func, help_ in (("prepare", cmd_prepare, "validate a source, write its case list"),
                              ("preprocess", cmd_preprocess, "fingerprint and preprocessing plan"),
                              ("split", cmd_split, "train / val / test split (written once)"),
                              ("report-dataset", cmd_report_dataset,
                               "comparison and QC pages of a dataset")):
        p = sub.add_parser(name, help=help_)
        with_config(p)
        p.set_defaults(func=func)

    p = sub.add_parser("report-studies", help="one diagnostic report per test study")
    with_config(p)
    p.add_argument("-m", "--model", required=True)
    p.set_defaults(func=cmd_report_studies)

    p = sub.add_parser("train", help="train (or resume) one model")
    with_config(p)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-epochs", type=int, default=None,
                   help="stop after this epoch (training resumes on the next call)")
    p.add_argument("--fold", type=int, default=None, help=FOLD_HELP)
    p.add_argument("--fraction", default=None, help=FRACTION_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate-shift",
                       help="evaluate a model on the test cases under one shift (severities 1-5)")
    with_config(p)
    p.add_argument("-m", "--model", required=True)
    p.add_argument("--shift", required=True,
                   help="a shift of the dataset's list, or 'none' (the clean reference)")
    p.add_argument("--severity", type=int, action="append", default=[],
                   help="one severity (repeatable; default: the config's shift.severities)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--fold", type=int, default=None, help=FOLD_HELP)
    p.set_defaults(func=cmd_evaluate_shift)

    p = sub.add_parser("generalisation",
                       help="corruption errors (mCE) and learning curves of a dataset's models")
    with_config(p)
    p.set_defaults(func=cmd_generalisation)

    p = sub.add_parser("crossval", help="one model's validation metrics over all folds")
    with_config(p)
    p.add_argument("-m", "--model", required=True)
    p.set_defaults(func=cmd_crossval)

    for name, func, help_ in (("evaluate", cmd_evaluate, "evaluate a model on a dataset stage"),
                              ("report", cmd_report, "HTML report of a model on a stage")):
        p = sub.add_parser(name, help=help_)
        with_config(p)
        p.add_argument("-m", "--model", required=True)
        p.add_argument("-s", "--stage", required=True, choices=("train", "val", "test"))
        if name == "evaluate":
            p.add_argument("--threads", type=int, default=None)
            p.add_argument("--fold", type=int, default=None, help=FOLD_HELP)
            p.add_argument("--fraction", default=None,
                           help=FRACTION_HELP + " (test stage only: eval/MODEL/fraction-LABEL/test)")
            how = p.add_mutually_exclusive_group()
            how.add_argument("--case", default=None,
                             help="evaluate only this case (its id or file name) into "
                                  "eval/.../STAGE/cases/ID.json")
            how.add_argument("--from-cases", action="store_true",
                             help="build the stage's tables from the per-case files")
        p.set_defaults(func=func)

    p = sub.add_parser("summarize", help="results/summary.json and results/index.html")
    with_config(p, dataset=False)
    p.set_defaults(func=cmd_summarize)

    p = sub.add_parser("predict", help="predict new studies with a trained model")
    p.add_argument("--model", required=True, help="checkpoint (best.pt) written by training")
    p.add_argument("studies", nargs="*", help="NIfTI files or DICOM series folders")
    p.add_argument("--out", default="predictions", help="output folder")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    recorded = " (default: as recorded in inference.json beside the checkpoint)"
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="test-time flips (and a segmenter's uncertainty map)" + recorded)
    p.add_argument("--tta-flips", choices=("axes", "mirror"), default=None,
                   help="which flips: each axis, or every combination (nnU-Net)" + recorded)
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in [0, 1)" + recorded)
    p.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=None,
                   help="segmentation: keep the largest connected component of each label"
                        + recorded)
    p.add_argument("--sw-batch-size", type=int, default=None,
                   help="windows per forward pass (memory and time only; default 2)")
    p.add_argument("--dicom-out", action="store_true",
                   help="for DICOM series inputs also write a DICOM SEG and a DICOM SR (TID 1500)")
    p.add_argument("--dicomweb", metavar="URL",
                   help="DICOMweb server to read the study from (credentials: environment or "
                        "netrc, see README); implies --dicom-out")
    p.add_argument("--study", metavar="UID", help="with --dicomweb: StudyInstanceUID")
    p.add_argument("--series", metavar="UID",
                   help="with --dicomweb: one SeriesInstanceUID (default: every image series)")
    p.add_argument("--store", action="store_true",
                   help="with --dicomweb: store the SEG and SR back on the server (STOW-RS)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("models", help="list the models")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``capsmed``; returns the exit status."""
    # Before torch loads OpenMP: threads that wait passively instead of spinning. Snakemake runs
    # several jobs on the same cores, and spinning threads then slow every job down many times
    # (see BENCHMARKS.md, capsule layers). Set OMP_WAIT_POLICY yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose, args.log)
    try:
        return int(args.func(args) or 0)
    except CapsmedError as exc:
        for line in str(exc).splitlines():
            print(f"capsmed: error: {line}", file=sys.stderr)
        logger.debug("details", exc_info=True)
        if args.log:
            with open(args.log, "a", encoding="utf-8") as fh:
                fh.writelines(f"capsmed: error: {line}\n" for line in str(exc).splitlines())
        return 2
    except KeyboardInterrupt:
        print("capsmed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
