"""`common.launcher`: when a stage re-executes itself under `accelerate launch`, the command it builds, what the
other ranks skip, the accelerate configs, and the GPU profile. No GPU needed: accelerate's own launch code checks
the configs, and a 2-process launch on CPU runs the real re-execution end to end."""

import importlib
import os
import socket
import subprocess
import sys

import mlflow
import pytest
import yaml

from posttrain import cli, config, training
from stages import dpo, prepare, sft
from tests.conftest import ROOT, tiny_params

CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
DDP = ROOT / "configs" / "accelerate" / "ddp.yaml"


class Relaunched(Exception):
    """Raised by the stand-in for os.execve: the command and environment the stage would have become."""


@pytest.fixture()
def no_exec(monkeypatch):
    """Replace os.execve, and clear the variables of any launcher the test itself might run under."""
    for var in (cli.MARKER, "LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(var, raising=False)

    def execve(path, argv, env):
        raise Relaunched(argv, env)

    monkeypatch.setattr(os, "execve", execve)


@pytest.mark.parametrize(("stage", "launcher", "env", "relaunch"), [
    ("sft", "", {}, False),                                           # no launcher: plain python
    ("sft", "configs/accelerate/ddp.yaml", {}, True),
    ("dpo", "configs/accelerate/zero3.yaml", {}, True),
    ("sft", "configs/accelerate/ddp.yaml", {cli.MARKER: "1"}, False),  # already re-executed
    ("sft", "configs/accelerate/ddp.yaml", {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}, False),  # torchrun
    ("sft", "configs/accelerate/ddp.yaml", {"ACCELERATE_MIXED_PRECISION": "bf16"}, False),  # one-process accelerate
    ("generate", "configs/accelerate/ddp.yaml", {}, False),          # vLLM splits the model itself
    ("token_reward", "configs/accelerate/ddp.yaml", {}, False),
])
def test_relaunch_decision(stage, launcher, env, relaunch):
    assert cli.relaunches(stage, launcher, env) is relaunch


def _stage_calls(stage, argv, monkeypatch):
    """The command `stage.main(argv)` re-executes as, and the args namespace the relaunched process parses."""
    module = importlib.import_module(f"stages.{stage}")
    seen = []
    real = cli.execute
    monkeypatch.setattr(cli, "execute", lambda *a, **k: (seen.append(dict(vars(a[2]))), real(*a, **k))[1])
    with pytest.raises(Relaunched) as err:
        module.main(argv)
    cmd, env = err.value.args
    monkeypatch.setenv(cli.MARKER, env[cli.MARKER])
    monkeypatch.setattr(cli, "execute", lambda *a, **k: seen.append(dict(vars(a[2]))) or {})
    module.main(cmd[7:])
    return cmd, seen


@pytest.mark.parametrize("stage", cli.LAUNCHED)
def test_relaunched_command_parses_back_to_the_same_arguments(stage, tmp_path, no_exec, monkeypatch):
    params = tiny_params(tmp_path, common={"launcher": str(DDP)})
    argv = {"sft": ["--model", "models/base", "--data", "data/prepare/sft.jsonl", "--out", "models/sft"],
            "dpo": ["--variant", "dpo", "--model", "models/sft", "--prefs", "data/label/prefs.jsonl",
                    "--reference", "data/reference", "--guidance", "data/reference", "--out", "models/dpo/dpo"],
            }[stage] + ["--params", str(params)]
    cmd, (first, second) = _stage_calls(stage, argv, monkeypatch)
    assert cmd[:7] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP), "-m",
                       f"stages.{stage}"]
    assert first == second


def test_launcher_that_is_not_a_file_is_named(tmp_path, no_exec):
    params = tiny_params(tmp_path, common={"launcher": "configs/accelerate/nope.yaml"})
    with pytest.raises(SystemExit, match="common.launcher: configs/accelerate/nope.yaml: no such accelerate config"):
        sft.main(["--params", str(params), "--model", "m", "--data", "d", "--out", str(tmp_path / "o")])


def test_launcher_must_be_a_config_file(tmp_path):
    params = tiny_params(tmp_path, common={"launcher": "accelerate launch"})
    with pytest.raises(config.ParamsError, match="common: launcher must be '' or an accelerate config file"):
        config.load(prepare.PrepareParams, "prepare", params)


def test_stages_outside_launched_ignore_the_launcher(tmp_path, no_exec):
    params = tiny_params(tmp_path, common={"launcher": str(DDP)})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "data")])  # os.execve would raise
    assert (tmp_path / "data" / "train.jsonl").exists()


def test_other_ranks_open_no_mlflow_run(tmp_path, no_exec, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    params = tiny_params(tmp_path)
    metrics = prepare.main(["--params", str(params), "--out", str(tmp_path / "data")])
    assert "peak_rss_mb" not in metrics  # added only inside the MLflow run
    assert not (tmp_path / "mlflow.db").exists()


def test_save_writes_on_the_main_process_only(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    monkeypatch.setenv("RANK", "1")
    training.save(model, tmp_path / "rank1", "base", [], {"x": 1})
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setenv("RANK", "0")
    training.save(model, tmp_path / "rank0", "base", [], {"x": 1})
    written = {p.name for p in (tmp_path / "rank0").iterdir()}
    assert {"config.json", "model.safetensors", "hyperparameters.yaml"} <= written


def _accelerate_env(path):
    """The launch arguments and child environment `accelerate launch --config_file path` would produce."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "stages.sft", "--params", "p"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        return args, prepare_deepspeed_cmd_env(args)[1]
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_resolve(path):
    """Each config loads with accelerate's own launch code, and sets what posttrain.training reads."""
    args, env = _accelerate_env(path)
    assert args.num_processes >= 2 and args.mixed_precision == "bf16"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"  # cli.under_launcher's sign of a launched process
    kind = path.stem
    assert (env.get("ACCELERATE_USE_FSDP") == "true") is (kind == "fsdp")
    assert (env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3") is (kind == "zero3")
    if kind == "fsdp":
        assert env["FSDP_VERSION"] == "2" and env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"


def test_the_three_configs_are_there():
    assert {p.stem for p in CONFIGS} == {"ddp", "fsdp", "zero3"}


# --- profiles/gpu.yaml: parsed by every stage's own params class, like the other profiles -----------------------

GPU = ROOT / "profiles" / "gpu.yaml"
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())


def _params_class(stage: str) -> type:
    name = "".join(part.capitalize() for part in stage.split("_")) + "Params"
    return getattr(importlib.import_module(f"stages.{stage}"), name)


def test_gpu_profile_parses_for_every_stage():
    data = config.read_yaml(GPU)
    assert set(data) == set(config.read_yaml(ROOT / "params.yaml")), "the same blocks as params.yaml"
    for stage in DVC["stages"]:
        common, _ = config.load(_params_class(stage), stage, GPU)
    _, dpo_params = config.load(dpo.DpoParams, "dpo", GPU)
    for variant in dpo_params.variants:
        dpo.resolve(dpo_params, variant, str(GPU))
    assert common.device == "cuda" and data["generate"]["backend"] == "vllm"
    assert not common.launcher or (ROOT / common.launcher).is_file()


def test_gpu_profile_has_every_key_of_params_yaml():
    """Same blocks and keys as params.yaml (values differ), so a new param cannot be forgotten in the GPU profile."""
    def keys(d, prefix=""):
        out = set()
        for k, v in d.items():
            if prefix.endswith(("variants.", "sources.", "models.", "task_mix.")):
                continue
            out.add(prefix + k)
            if isinstance(v, dict):
                out |= keys(v, f"{prefix}{k}.")
        return out

    assert keys(config.read_yaml(GPU)) == keys(config.read_yaml(ROOT / "params.yaml"))


def test_gpu_profile_dvc_params_exist():
    data = config.read_yaml(GPU)
    for stage in DVC["stages"].values():
        if "foreach" in stage:
            node = data
            for part in stage["foreach"].strip("${}").split("."):
                node = node[part]
            wanted = [p.replace("${key}", k) for k in node for p in stage["do"].get("params", [])]
        else:
            wanted = stage.get("params", [])
        for dotted in wanted:
            node = data
            for part in dotted.split("."):
                assert isinstance(node, dict) and part in node, f"profiles/gpu.yaml lacks {dotted!r}"
                node = node[part]


# --- the real re-execution, on CPU: accelerate's multi-GPU launcher with 2 processes (gloo on CPU) --------------

TWO_PROCESSES = {"compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "mixed_precision": "no",
                 "num_processes": 2, "num_machines": 1, "machine_rank": 0, "gpu_ids": "all",
                 "rdzv_backend": "static", "same_network": True, "use_cpu": False, "debug": False}


def test_sft_relaunches_under_accelerate_on_two_processes(workdir, tmp_path):
    """`python -m stages.sft` with a launcher becomes `accelerate launch -m stages.sft` on 2 ranks (torchrun, gloo
    here): each rank takes half of every batch, rank 0 alone writes the adapter and the one MLflow run."""
    with socket.socket() as sock:  # a free port: other test runs on this machine may hold torchrun's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = tmp_path / "two.yaml"
    cfg.write_text(yaml.safe_dump(TWO_PROCESSES | {"main_process_port": port}))
    params = tiny_params(tmp_path, common={"launcher": str(cfg)})
    prepare.main(["--params", str(params), "--out", str(tmp_path / "data")])
    env = {k: v for k, v in os.environ.items()
           if k not in (cli.MARKER, "LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION")}
    out = tmp_path / "models" / "sft"
    proc = subprocess.run([sys.executable, "-m", "stages.sft", "--params", str(params), "--model",
                           str(workdir / "models" / "base"), "--data", str(tmp_path / "data" / "sft.jsonl"),
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "relaunching:" in proc.stderr and "accelerate.commands.launch" in proc.stderr
    assert {"adapter_config.json", "adapter_model.safetensors", "chain.json"} <= {p.name for p in out.iterdir()}
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=["posttrain"], output_format="list")}
    assert sorted(runs) == ["prepare", "sft"]
    # 12 demos, 4 a rank, 2 ranks: 2 optimizer steps (one process would take 3)
    assert runs["sft"].data.metrics["rows"] == 12 and runs["sft"].data.metrics["steps"] == 2


def test_gpu_docs_install_the_gpu_extra():
    """docs/gpu.md installs the `gpu` extra's pins by name (`.[gpu]` does not resolve with prefect): kept equal."""
    import tomllib

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    line = next(x for x in (ROOT / "docs" / "gpu.md").read_text().splitlines() if x.startswith("pip install vllm"))
    assert sorted(line.split("#")[0].split()[2:]) == sorted(extra)
