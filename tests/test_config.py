"""Every params block parses into its stage's dataclass; dvc.yaml names only keys that exist; bad params fail."""

import importlib
from pathlib import Path

import pytest
import yaml

from posttrain import config, losses
from stages import dpo

ROOT = Path(__file__).resolve().parents[1]
PROFILES = [ROOT / "params.yaml", ROOT / "profiles" / "tiny.yaml", ROOT / "profiles" / "long.yaml"]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def params_class(stage: str) -> type:
    name = "".join(part.capitalize() for part in stage.split("_")) + "Params"
    return getattr(importlib.import_module(f"stages.{stage}"), name)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_block_parses(path):
    data = config.read_yaml(path)
    flows = {"iterative"}  # blocks read by flows/, not by a dvc.yaml stage
    assert set(data) == {"common"} | set(DVC["stages"]) | flows, "one params block per dvc.yaml stage, plus common"
    for stage in DVC["stages"]:
        config.load(params_class(stage), stage, path)
    _, dpo_params = config.load(dpo.DpoParams, "dpo", path)
    for variant in dpo_params.variants:
        dpo.resolve(dpo_params, variant, str(path))


def test_params_yaml_values_are_the_dataclass_defaults():
    """Defaults live in one place: every setting params.yaml gives equals its dataclass default, so a stage run
    without a params file (or a block left out) behaves as the default recipe. The named rows of a block (variants,
    sources, merge rows, evaluated models, report order) are the recipe itself and are left to params.yaml."""
    import dataclasses

    data = config.read_yaml(ROOT / "params.yaml")
    blocks = [(config.Common, "common")] + [(params_class(s), s) for s in DVC["stages"]]
    differ = []
    for cls, name in blocks:
        parsed, default = config.parse(cls, data.get(name), name), cls()
        for f in dataclasses.fields(cls):
            if isinstance(getattr(default, f.name), (dict, list)) or getattr(default, f.name) is None:
                continue
            if getattr(parsed, f.name) != getattr(default, f.name):
                differ.append(f"{name}.{f.name}: params.yaml {getattr(parsed, f.name)!r}, "
                              f"default {getattr(default, f.name)!r}")
    assert not differ, "\n".join(differ)


def _lookup(data: dict, dotted: str):
    node = data
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"params key {dotted!r} does not exist"
        node = node[part]


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_dvc_params_keys_exist(path):
    data = config.read_yaml(path)
    for name, stage in DVC["stages"].items():
        if "foreach" in stage:
            items = _resolve_ref(data, stage["foreach"])
            for key in items:
                for p in stage["do"].get("params", []):
                    _lookup(data, p.replace("${key}", key))
        else:
            for p in stage.get("params", []):
                _lookup(data, p)
        assert (ROOT / "stages" / f"{name}.py").exists(), f"stage {name} has no module stages/{name}.py"


def _resolve_ref(data, ref: str):
    node = data
    for part in ref.strip("${}").split("."):
        node = node[part]
    return node


BAD = [
    ({"dpo": {"defaults": {"beta": -0.1}}}, r"dpo.*beta must be > 0"),
    ({"dpo": {"defaults": {"learning_rate": 0}}}, r"learning_rate must be > 0"),
    ({"dpo": {"defaults": {"alpha": -1.0}}}, r"alpha must be in \[0, 10\]"),
    ({"dpo": {"defaults": {"loss": "nope"}}}, r"dpo.defaults: loss 'nope' is not one of \['dpo', 'dpop', 'ipo'"),
    ({"dpo": {"defaults": {"betta": 0.1}}}, r"dpo.defaults: unknown key\(s\) \['betta'\]"),
    ({"sft": {"epochs": "two"}}, r"sft.epochs: expected float, got str"),
    ({"sft": {"lora": "yes"}}, r"sft.lora: expected bool"),
    ({"generate": {"n_samples": 1}}, r"n_samples must be >= 2"),
    ({"label": {"margin": 2.0}}, r"margin must be in \[0, 1\]"),
    ({"prepare": {"task_mix": {"poetry": 1.0}}}, r"unknown task\(s\) \['poetry'\]"),
    ({"common": {"device": "tpu"}}, r"common.device: 'tpu' is not one of"),
]


@pytest.mark.parametrize(("override", "message"), BAD)
def test_bad_params_fail_with_the_key_path(tmp_path, override, message):
    data = config.read_yaml(ROOT / "profiles" / "tiny.yaml")
    for block, values in override.items():
        for k, v in values.items():
            if isinstance(v, dict) and isinstance(data[block].get(k), dict):
                data[block][k] = {**data[block][k], **v}
            else:
                data[block][k] = v
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    stage = next(b for b in override if b != "common") if set(override) != {"common"} else "label"
    with pytest.raises(config.ParamsError, match=message) as err:
        _, params = config.load(params_class(stage), stage, path)
        if stage == "dpo":
            dpo.resolve(params, "dpo", str(path))
    assert str(path) in str(err.value)


def test_unreadable_params_file_is_named(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("common: [unclosed")
    with pytest.raises(config.ParamsError, match=f"{path}: not valid YAML"):
        config.read_yaml(path)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_evaluate_models_are_exactly_the_trained_and_merged_ones(path):
    """dvc.yaml's `foreach` needs one collection, so `evaluate.models` is written out; it names base/sft, every dpo
    variant and merge rows, each at the folder its stage writes (every merge row too in params.yaml; a profile may
    leave merges out to save time), and report derives its row order itself."""
    data = config.read_yaml(path)
    variants = {v: f"models/dpo/{v}" for v in data["dpo"]["variants"]}
    merges = {m: f"models/merge/{m}" for m in data["merge"]["models"]}
    models = data["evaluate"]["models"]
    rest = {k: v for k, v in models.items() if k not in ("base", "sft")}
    assert variants.items() <= rest.items() and rest.items() <= (variants | merges).items()
    if path.name == "params.yaml":
        assert rest == variants | merges
    assert models["sft"] == "models/sft" and models.get("base", "models/base") == "models/base"
    assert "order" not in data["report"], "report.order is derived (stages/report.py row_order)"


def test_default_runs_every_loss_and_evaluates_every_variant():
    """params.yaml has a dpo variant per loss in LOSSES, each evaluated; TGDPO rows name a guidance source."""
    _, params = config.load(dpo.DpoParams, "dpo", ROOT / "params.yaml")
    assert {dpo.resolve(params, v, "params.yaml").loss for v in params.variants} == set(losses.LOSSES)
    raw = config.read_yaml(ROOT / "params.yaml")
    assert set(params.variants) <= set(raw["evaluate"]["models"])
    sources = {f"data/guidance/{name}" for name in raw["guidance"]["sources"]}
    guided = {row["guidance"] for row in params.variants.values() if row["loss"] == "tgdpo"}
    assert guided == sources
