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


ROW = {"loss": "dpo", "guidance": "data/reference"}
BAD = [
    ({"dpo": {"variants": {"dpo": ROW | {"beta": -0.1}}}}, r"dpo.variants.dpo: beta must be > 0"),
    ({"dpo": {"defaults": {"learning_rate": 0}}}, r"dpo.defaults: learning_rate must be > 0"),
    ({"dpo": {"variants": {"dpo": ROW | {"loss": "tgdpo", "alpha": -1.0}}}}, r"alpha must be in \[0, 10\]"),
    ({"dpo": {"variants": {"dpo": ROW | {"loss": "nope"}}}},
     r"dpo.variants.dpo.loss: 'nope' is not one of \['dpo', 'dpop', 'ipo'"),
    ({"dpo": {"variants": {"dpo": ROW | {"betta": 0.1}}}},
     r"dpo.variants.dpo: unknown key\(s\) \['betta'\]; loss 'dpo' reads \['beta'\]"),
    ({"dpo": {"variants": {"dpo": ROW | {"loss": "kto", "alpha": 0.5}}}},
     r"dpo.variants.dpo: unknown key\(s\) \['alpha'\]; loss 'kto' reads \['beta', 'desirable_weight'"),
    ({"dpo": {"variants": {"dpo": ROW | {"nll_weight": 0.5}}}}, r"unknown key\(s\) \['nll_weight'\]"),
    ({"dpo": {"defaults": {"beta": 0.1}}}, r"dpo.defaults: unknown key\(s\) \['beta'\]"),  # the old shape
    ({"dpo": {"variants": {"dpo": ROW | {"loss": "tgdpo", "cancel_shared_prefix": "yes"}}}},
     r"dpo.variants.dpo.cancel_shared_prefix: expected bool"),
    ({"dpo": {"variants": {"dpo": ROW | {"loss": "tgdpo", "cap_rejected": "no"}}}},
     r"dpo.variants.dpo.cap_rejected: expected bool"),
    ({"dpo": {"variants": {"dpo": ROW | {"seed": 1.5}}}}, r"dpo.variants.dpo.seed: expected int"),
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
    """params.yaml has a dpo variant per loss in LOSSES, each evaluated; the guided rows name every guidance source,
    in the paper's form and with the shared prefix cancelled."""
    _, params = config.load(dpo.DpoParams, "dpo", ROOT / "params.yaml")
    rows = {v: dpo.resolve(params, v, "params.yaml") for v in params.variants}
    assert {r.loss for r in rows.values()} == set(losses.LOSSES)
    raw = config.read_yaml(ROOT / "params.yaml")
    assert set(params.variants) <= set(raw["evaluate"]["models"])
    sources = {f"data/guidance/{name}" for name in raw["guidance"]["sources"]}
    for cancel in (False, True):
        guided = {r.guidance for r in rows.values()
                  if losses.LOSSES[r.loss].guided and r.loss_params.cancel_shared_prefix is cancel}
        assert guided == sources, cancel
    assert rows["dpo"].loss_params == losses.DPOParams() and rows["rpo"].loss_params == losses.RPOParams()


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_variant_rows_write_no_default_twice(path):
    """A row gives a loss hyper-parameter only where it differs from its params class's default (written once)."""
    for name, row in config.read_yaml(path)["dpo"]["variants"].items():
        default = losses.LOSSES[row["loss"]].params()
        same = [k for k, v in row.items() if hasattr(default, k) and getattr(default, k) == v]
        assert not same, f"{path.name}: dpo.variants.{name} restates the default of {same}"


def test_a_row_parses_its_own_loss_params_and_may_override_a_training_knob():
    params = dpo.DpoParams(variants={"fast_kto": {"loss": "kto", "guidance": "data/reference", "beta": 0.3,
                                                  "learning_rate": 5e-5}})
    row = dpo.resolve(params, "fast_kto", "p.yaml")
    assert row.loss_params == losses.KTOParams(beta=0.3) and row.learning_rate == 5e-5
    assert row.seed == params.defaults.seed and row.epochs == params.defaults.epochs
    assert params.defaults.learning_rate == 3e-5  # the shared block is left as it was


def test_the_dpo_stage_depends_on_the_shared_block_and_its_own_row_only():
    """So a change to one row's hyper-parameter re-runs that row alone (tests/test_dvc.py sees it in dvc status)."""
    wanted = DVC["stages"]["dpo"]["do"]["params"]
    assert [p for p in wanted if p.startswith("dpo")] == ["dpo.defaults", "dpo.variants.${key}"]
    assert "common.seed" not in wanted and "common.seed" not in DVC["stages"]["sft"]["params"]


def test_floats_without_a_dot_read_as_floats_after_dvc_rewrites_params(tmp_path):
    """`dvc exp run -S dpo.defaults.learning_rate=3e-05` (bench.long_answers sets it in every experiment) writes
    3e-05 into params.yaml through DVC's own override code, which PyYAML reads as a string: every dpo stage then
    stopped ('expected float, got str'). read_yaml reads it as the float it is; a quoted one stays a string."""
    from dvc.utils.hydra import apply_overrides

    path = tmp_path / "params.yaml"
    path.write_text("dpo:\n  defaults: {learning_rate: 3.0e-05, seed: 0}\nnote: '3e-05'\n")
    apply_overrides(path, ["dpo.defaults.seed=1", "dpo.defaults.learning_rate=3.0e-05"])
    assert yaml.safe_load(path.read_text())["dpo"]["defaults"]["learning_rate"] == "3e-05"  # the trap
    data = config.read_yaml(path)
    assert data["dpo"]["defaults"] == {"learning_rate": 3e-05, "seed": 1} and data["note"] == "3e-05"
    got = config.parse(dpo.TrainParams, data["dpo"]["defaults"], "dpo.defaults")
    assert got.learning_rate == 3e-05 and got.seed == 1
    path.write_text("a: 1e4\nb: -2E+3\nc: 12\nd: 3e\n")
    assert config.read_yaml(path) == {"a": 10000.0, "b": -2000.0, "c": 12, "d": "3e"}
