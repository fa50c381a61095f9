"""Shared fixtures: the tiny profile's params and a tiny random base model, built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).parent / "assets"
STARTUP_S = 180
"""Seconds a Prefect test server may take to start: on 2 busy cores it has taken more than Prefect's default 20-30
(flows/ subprocesses read the same through PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."""
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(STARTUP_S))


def tiny_params(tmp: Path, **overrides) -> Path:
    """Write the tiny profile to `tmp/params.yaml` with its MLflow store in `tmp`; `overrides` replace blocks."""
    params = yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text())
    params["common"]["mlflow_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
    for block, values in overrides.items():
        params[block] = {**params.get(block, {}), **values}
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A session scratch dir holding params.yaml and the tiny base model (models/base)."""
    from stages import base

    tmp = tmp_path_factory.mktemp("work")
    params = tiny_params(tmp)
    base.main(["--params", str(params), "--out", str(tmp / "models" / "base")])
    return tmp


@pytest.fixture()
def clean_copy(tmp_path) -> Path:
    """The repo's pipeline files copied into a fresh dir, with the tiny profile as params.yaml."""
    for name in ("stages", "posttrain", "profiles"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "profiles" / "tiny.yaml", tmp_path / "params.yaml")
    return tmp_path
