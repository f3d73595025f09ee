import pytest
import yaml

from capsmed.config import (
    deep_merge,
    evaluation_hash,
    load_config,
    model_config_hash,
    path_fold,
    resolve_fold,
    train_config,
    trained_folds,
    validate_config,
)
from capsmed.errors import CapsmedError
from capsmed.paths import DatasetLayout, Layout


def _ds(**kw):
    base = {"source": "synthetic", "task": "segmentation", "spatial_dims": 3,
            "synthetic": {"size": [16, 16, 16]}}
    base.update(kw)
    return base


def test_default_config_validates_with_defaults(repo_root):
    cfg = load_config(repo_root / "config" / "config.yaml")
    assert set(cfg["datasets"]) == {"demo_seg3d", "demo_cls2d"}
    assert cfg["train"]["optimizer"] == "adam"
    assert cfg["datasets"]["demo_seg3d"]["split"]["folds"] == 1


@pytest.mark.parametrize("name", ["msd_hippocampus", "breastmnist", "adrenalmnist3d",
                                  "csv_manifest"])
def test_example_configs_validate(repo_root, name):
    from capsmed.models.registry import config_problems

    cfg = load_config(repo_root / "config" / "examples" / f"{name}.yaml", ["data_root=/data"])
    for ds in cfg["datasets"].values():
        assert ds["path"].startswith("/data")
    # every models entry names real options (the data folder /data is the only thing missing)
    assert [p for p in config_problems(cfg, f"{name}.yaml") if "does not exist" not in p] == []


def test_example_without_data_root_is_a_clear_error(repo_root):
    with pytest.raises(CapsmedError, match=r"uses \{data_root\} but data_root is not set"):
        load_config(repo_root / "config" / "examples" / "breastmnist.yaml")


def test_train_overrides_merge_global_dataset_model():
    cfg = validate_config({"train": {"epochs": 5, "batch_size": 3},
                           "datasets": {"d": _ds(train={"epochs": 7})},
                           "models": {"unet": {"train": {"learning_rate": 0.01}}}})
    merged = train_config(cfg, "d", "unet")
    assert merged["epochs"] == 7 and merged["batch_size"] == 3 and merged["learning_rate"] == 0.01
    assert train_config(cfg, "d", "segcaps")["learning_rate"] == 0.001


def test_unknown_key_is_named():
    with pytest.raises(CapsmedError, match="datasets.d: Additional properties are not allowed"):
        validate_config({"datasets": {"d": _ds(colour="red")}})


def test_wrong_enum_is_named():
    with pytest.raises(CapsmedError, match="datasets.d.task: 'regression' is not one of"):
        validate_config({"datasets": {"d": _ds(task="regression")}})


def test_size_must_match_spatial_dims():
    with pytest.raises(CapsmedError, match="synthetic.size has 2 values but spatial_dims is 3"):
        validate_config({"datasets": {"d": _ds(synthetic={"size": [16, 16]})}})


def test_file_source_needs_path():
    with pytest.raises(CapsmedError, match="source msd needs a path"):
        validate_config({"datasets": {"d": _ds(source="msd")}})


def test_patch_size_must_match_spatial_dims():
    with pytest.raises(CapsmedError, match="preprocess.patch_size has 2 values"):
        validate_config({"datasets": {"d": _ds(preprocess={"patch_size": [16, 16]})}})


def test_fold_must_be_below_folds():
    with pytest.raises(CapsmedError, match="split.fold is 3 but folds is 2"):
        validate_config({"datasets": {"d": _ds(split={"folds": 2, "fold": 3})}})


def test_one_fold_keeps_the_plain_paths():
    cfg = validate_config({"results": "r", "datasets": {"d": _ds()}})
    assert resolve_fold(cfg, "d") == (0, None)
    assert path_fold(cfg, "d") is None and trained_folds(cfg, "d") == [0]
    lay = Layout("r")
    assert lay.model_dir("d", "unet", None).as_posix() == "r/d/models/unet"
    assert lay.eval_dir("d", "unet", "val", None).as_posix() == "r/d/eval/unet/val"


def test_several_folds_put_each_fold_in_its_own_folder():
    cfg = validate_config({"results": "r", "datasets": {"d": _ds(split={"folds": 4, "fold": 2})}})
    assert resolve_fold(cfg, "d") == (2, 2)
    assert resolve_fold(cfg, "d", 0) == (0, 0)
    assert path_fold(cfg, "d") == 2 and trained_folds(cfg, "d") == [0, 1, 2, 3]
    lay = Layout("r")
    assert lay.model_dir("d", "unet", 3).as_posix() == "r/d/models/unet/fold3"
    assert lay.eval_dir("d", "unet", "val", 3).as_posix() == "r/d/eval/unet/fold3/val"
    assert lay.crossval("d", "unet").as_posix() == "r/d/cv/unet.json"
    view = DatasetLayout("r", "d", 3)  # the pages' view of the same paths
    assert view.model_dir("unet") == lay.model_dir("d", "unet", 3)
    assert view.eval_dir("unet", "val") == lay.eval_dir("d", "unet", "val", 3)
    assert (view.cases, view.fingerprint, view.plan, view.splits, view.reports_dir) == (
        lay.cases("d"), lay.fingerprint("d"), lay.plan("d"), lay.splits("d"), lay.reports("d"))
    only = validate_config({"datasets": {"d": _ds(split={"folds": 4, "fold": 2,
                                                         "cross_validate": False})}})
    assert trained_folds(only, "d") == [2]


def test_asking_for_a_fold_that_does_not_exist():
    cfg = validate_config({"datasets": {"d": _ds(split={"folds": 3})}})
    with pytest.raises(CapsmedError, match=r"dataset d: fold 3 does not exist \(split.folds is 3, "
                                           r"so folds are 0 to 2\)"):
        resolve_fold(cfg, "d", 3)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(CapsmedError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed\n")
    with pytest.raises(CapsmedError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(CapsmedError, match="top level must be a mapping"):
        load_config(lst)


def test_overrides_are_parsed_as_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"datasets": {"d": _ds()}}))
    cfg = load_config(path, ["train.epochs=2", "datasets.d.models=[segcaps]"])
    assert cfg["train"]["epochs"] == 2 and cfg["datasets"]["d"]["models"] == ["segcaps"]
    with pytest.raises(CapsmedError, match="expected KEY=VALUE"):
        load_config(path, ["train.epochs"])


def test_model_hash_changes_with_training_settings():
    cfg = validate_config({"datasets": {"d": _ds()}})
    other = deep_merge(cfg, {"train": {"epochs": 99}})
    assert model_config_hash(cfg, "d", "unet") != model_config_hash(other, "d", "unet")
    inference_only = deep_merge(cfg, {"inference": {"overlap": 0.5}})
    assert model_config_hash(cfg, "d", "unet") == model_config_hash(inference_only, "d", "unet")


def test_config_readme_documents_every_schema_key(repo_root):
    import re

    text = (repo_root / "config" / "README.md").read_text()
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    names = set()

    def collect(node):
        if isinstance(node, dict):
            for key, value in node.get("properties", {}).items():
                names.add(key)
                collect(value)
            for value in node.values():
                if isinstance(value, dict):
                    collect(value)

    collect(schema)
    documented = set(re.findall(r"\| `(?:[A-Za-z_.]+\.)?([a-z_0-9]+)` \|", text))
    assert names <= documented, sorted(names - documented)


def test_schema_properties_are_well_formed(repo_root):
    """Every property has a description and only JSON Schema keywords (a YAML flow mapping with
    an unquoted comma would silently add junk keywords)."""
    schema = yaml.safe_load((repo_root / "workflow" / "schemas" / "config.schema.yaml").read_text())
    keywords = {"type", "description", "default", "enum", "minimum", "maximum", "exclusiveMinimum",
                "exclusiveMaximum", "items", "minItems", "maxItems", "properties", "required",
                "additionalProperties", "$ref", "propertyNames", "minProperties", "pattern",
                "uniqueItems"}

    def check(props, where, overlay=False):
        for name, sub in props.items():
            assert set(sub) <= keywords, f"{where}.{name}: {set(sub) - keywords}"
            if not overlay:  # default-only overlays of a $ref'd block carry no description
                assert "description" in sub, f"{where}.{name} has no description"
            if "properties" in sub:
                check(sub["properties"], f"{where}.{name}", overlay="$ref" in sub)

    check(schema["properties"], "top")
    for name, sub in schema["$defs"].items():
        check(sub.get("properties", {}), name)


def test_one_definition_of_the_same_trained_model(repo_root):
    """split.fold only picks the reported fold: no hash of data or model depends on it, and the
    Snakefile's params use capsmed's hash functions rather than its own."""
    from capsmed.config import dataset_hash

    cfg = validate_config({"datasets": {"d": _ds(split={"folds": 3, "fold": 0})}})
    moved = validate_config({"datasets": {"d": _ds(split={"folds": 3, "fold": 2,
                                                         "cross_validate": False})}})
    for fn in (dataset_hash,):
        assert fn(cfg, "d") == fn(moved, "d")
    for fn in (model_config_hash, evaluation_hash):
        assert fn(cfg, "d", "unet") == fn(moved, "d", "unet")
    other = validate_config({"datasets": {"d": _ds(split={"folds": 4, "fold": 0})}})
    assert dataset_hash(cfg, "d") != dataset_hash(other, "d")
    assert model_config_hash(cfg, "d", "unet") != model_config_hash(other, "d", "unet")
    inference = deep_merge(cfg, {"inference": {"overlap": 0.5}})
    assert evaluation_hash(cfg, "d", "unet") != evaluation_hash(inference, "d", "unet")
    smk = (repo_root / "workflow" / "rules" / "common.smk").read_text()
    assert "hashlib" not in smk and "model_config_hash(config" in smk


def test_model_variants_are_checked_through_their_model():
    from capsmed.config import model_class
    from capsmed.models.registry import config_problems

    cfg = validate_config({
        "datasets": {"d": {"source": "synthetic", "task": "segmentation",
                           "models": ["capsunet_1iter", "unet"]}},
        "models": {"capsunet_1iter": {"model": "capsunet", "args": {"routing_iterations": 1}}}})
    assert model_class(cfg, "capsunet_1iter") == "capsunet" and model_class(cfg, "unet") == "unet"
    assert config_problems(cfg, "c.yaml") == []
    cfg["models"]["capsunet_1iter"]["args"] = {"iterations": 1}
    cfg["models"]["bad"] = {"model": "capsunett", "args": {}, "train": {}}
    problems = config_problems(cfg, "c.yaml")
    assert any("models.capsunet_1iter.args: unknown option 'iterations' of capsunet" in p
               for p in problems)
    assert any(p.startswith("c.yaml: models.bad.model: unknown model 'capsunett'") for p in problems)
    cfg["datasets"]["d"]["models"] = ["nope"]
    assert any("unknown model 'nope'; accepted: " in p and "variants in models: bad, capsunet_1iter"
               in p for p in config_problems(cfg, "c.yaml"))


# --- learning curves: train.fractions, train.minority_fraction, train.spatial_augment ------------


def _cls_ds(**train):
    return _ds(task="classification", spatial_dims=2, synthetic={"size": [16, 16]},
               models=["seed_cnn"], train=train)


def test_subset_keys_leave_the_ordinary_models_hash_alone():
    plain = validate_config({"datasets": {"d": _cls_ds()}})
    curves = validate_config({"datasets": {"d": _cls_ds(fractions=[0.1, 0.5, 1.0],
                                                         minority_fraction=[0.25],
                                                         minority_class=1)}})
    for fn in (model_config_hash, evaluation_hash):
        assert fn(plain, "d", "seed_cnn") == fn(curves, "d", "seed_cnn")
    # a fraction model has its own hash, and the minority class is part of a minority model's
    assert model_config_hash(curves, "d", "seed_cnn", "0.1") != model_config_hash(
        curves, "d", "seed_cnn")
    assert model_config_hash(curves, "d", "seed_cnn", "0.1") != model_config_hash(
        curves, "d", "seed_cnn", "0.5")
    other_class = deep_merge(curves, {"datasets": {"d": {"train": {"minority_class": 0}}}})
    assert model_config_hash(curves, "d", "seed_cnn", "0.1") == model_config_hash(
        other_class, "d", "seed_cnn", "0.1")
    assert model_config_hash(curves, "d", "seed_cnn", "minority0.25") != model_config_hash(
        other_class, "d", "seed_cnn", "minority0.25")
    assert evaluation_hash(curves, "d", "seed_cnn", "0.5") != evaluation_hash(
        curves, "d", "seed_cnn")


def test_spatial_augment_off_changes_the_hash_and_on_hashes_as_before():
    cfg = validate_config({"datasets": {"d": _ds()}})
    assert cfg["train"]["spatial_augment"] is True
    off = deep_merge(cfg, {"train": {"spatial_augment": False}})
    assert model_config_hash(cfg, "d", "unet") != model_config_hash(off, "d", "unet")
    # the default hashes as a config from before the key existed
    from capsmed.config import hashed_train_config, train_config

    tcfg = train_config(cfg, "d", "unet")
    assert "spatial_augment" not in hashed_train_config(tcfg)
    assert hashed_train_config(train_config(off, "d", "unet"))["spatial_augment"] is False


def test_fraction_labels_and_subset_spec():
    from capsmed.config import fraction_label, fraction_labels, parse_fraction, subset_spec

    cfg = validate_config({"datasets": {"d": _cls_ds(fractions=[0.1, 0.25, 1.0],
                                                     minority_fraction=[0.5, 1])}})
    assert fraction_labels(cfg, "d", "seed_cnn") == ["0.1", "0.25", "minority0.5"]
    assert fraction_label(1) == "1.0" and fraction_label(0.5, minority=True) == "minority0.5"
    assert parse_fraction("minority0.5") == ("minority", 0.5)
    assert subset_spec(cfg, "d", "seed_cnn", "0.250") == {
        "label": "0.25", "kind": "fraction", "value": 0.25, "minority_class": None}
    assert subset_spec(cfg, "d", "seed_cnn", "minority0.5")["kind"] == "minority"
    assert fraction_labels(validate_config({"datasets": {"d": _ds()}}), "d", "unet") == []


def test_fraction_label_errors():
    from capsmed.config import parse_fraction, subset_spec

    cfg = validate_config({"datasets": {"d": _cls_ds(fractions=[0.25])}})
    with pytest.raises(CapsmedError, match=r"fraction 'half': expected a share such as 0.25"):
        parse_fraction("half")
    with pytest.raises(CapsmedError, match=r"fraction '1.5': the share must lie in \(0, 1\]"):
        parse_fraction("1.5")
    with pytest.raises(CapsmedError, match=r"dataset d, model seed_cnn: fraction 0.5 is not in "
                                           r"train.fractions \(\[0.25\]\)"):
        subset_spec(cfg, "d", "seed_cnn", "0.5")
    with pytest.raises(CapsmedError, match="fraction 1.0 is the ordinary model"):
        subset_spec(cfg, "d", "seed_cnn", "1.0")


def test_fractions_out_of_range_are_schema_errors():
    with pytest.raises(CapsmedError, match=r"datasets.d.train.fractions.0: 0 is less than or "
                                           r"equal to the minimum of 0"):
        validate_config({"datasets": {"d": _ds(train={"fractions": [0, 0.5]})}})
    with pytest.raises(CapsmedError, match=r"datasets.d.train.fractions.1: 1.5 is greater than "
                                           r"the maximum of 1"):
        validate_config({"datasets": {"d": _ds(train={"fractions": [0.5, 1.5]})}})


def test_minority_keys_on_a_segmentation_dataset_are_errors():
    with pytest.raises(CapsmedError, match=r"config: datasets.d: train.minority_fraction is for "
                                           r"classification datasets, but the task is "
                                           r"segmentation"):
        validate_config({"datasets": {"d": _ds(train={"minority_fraction": [0.5]})}})
    with pytest.raises(CapsmedError, match=r"datasets.d: train.minority_class is for "
                                           r"classification datasets"):
        validate_config({"datasets": {"d": _ds()}, "train": {"minority_class": 1}})
