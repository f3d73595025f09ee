import pytest
import yaml

from capsmed.config import (
    deep_merge,
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
                "additionalProperties", "$ref", "propertyNames", "minProperties", "pattern"}

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
    from capsmed.config import dataset_hash, evaluation_hash

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
