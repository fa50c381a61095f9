"""The GPU check's dry run (bench/gpu_check.py, bench/carry.py) without a GPU: the carried set in .whl, where
`make gpu-wheels` has made it, passes; and on hand-made wheels and trees its checks refuse what would fail on the
device machine: two versions of one package, an unmet need, a wheel for another Python or platform, a tree and
carried folder over the tool's limit, a file changed since the tree was recorded."""

import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from bench import carry, gpu_check, machine
from posttrain import config
from stages import dpo, generate, guidance, label, prepare, reference, sft
from tests.conftest import ROOT

WHL = ROOT / ".whl"


def wheel(folder: Path, name: str, version: str, requires=(), tag: str = "py3-none-any", files=None) -> Path:
    """A wheel holding only its METADATA (with `requires` as Requires-Dist) and `files` (default: one package)."""
    folder.mkdir(exist_ok=True)
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-{tag}.whl"
    needs = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{needs}")
        for f in files or [f"{name.replace('-', '_')}/__init__.py"]:
            z.writestr(f, "")
    return path


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture()
def repo(tmp_path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    git(r, "init", "-q")
    (r / ".gitignore").write_text("ignored/\n")
    (r / "code.py").write_text("x = 1\n" * 500)  # 3000 bytes
    git(r, "add", "-A")
    git(r, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return r


@pytest.mark.skipif(not any(WHL.glob("*.whl")), reason="no .whl/*.whl: `make gpu-wheels` downloads the carried set")
def test_the_carried_set_passes_the_dry_run():
    sizes, problems = gpu_check.dry_run_problems(ROOT, WHL)
    assert problems == []
    assert sizes["total_mib"] <= 50, sizes  # the issue's budget, under the tool's 64 MiB
    wheels, _ = carry.wheel_problems(WHL, gpu_check.CARRIED)
    assert sorted(f"{w.name}=={w.version}" for w in wheels.values()) == sorted(
        f"{carry.canonicalize_name(p.split('==')[0])}=={p.split('==')[1]}" for p in gpu_check.pins(
            ROOT / "requirements.lock"))  # exactly the lock's versions


def test_every_carried_name_is_pinned_in_the_lock():
    pins = gpu_check.pins(ROOT / "requirements.lock")
    assert len(pins) == len(gpu_check.CARRIED) and all("==" in p for p in pins)


def test_a_complete_set_passes_and_conditional_needs_are_skipped(tmp_path):
    wheel(tmp_path, "a", "1.0", ["b>=1", "numpy", "c; extra == 'x'", "d; sys_platform == 'win32'",
                                 "e; python_version < '3.11'"])
    wheel(tmp_path, "b", "1.2", tag="cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64")
    wheel(tmp_path, "f", "2.0", tag="cp311-abi3-manylinux_2_28_x86_64")  # the stable ABI of 3.11 loads on 3.12
    wheels, problems = carry.wheel_problems(tmp_path, ["a", "b", "f"], image={"numpy": None})
    assert problems == []
    assert [str(r) for r in wheels["a"].requires] == ["b>=1", "numpy"]


def test_two_versions_of_one_package_are_refused(tmp_path):
    wheel(tmp_path, "a-b", "1.0")
    wheel(tmp_path, "a-b", "1.1")
    _, problems = carry.wheel_problems(tmp_path, ["A_b"], image={})
    assert problems == ["a-b: two versions (a_b-1.0-py3-none-any.whl, a_b-1.1-py3-none-any.whl): keep one, or pip "
                        "stops"]


def test_an_unmet_need_is_named(tmp_path):
    wheel(tmp_path, "a", "1.0", ["zzz>=1", "b>=2", "numpy>=2"])
    wheel(tmp_path, "b", "1.2")
    _, problems = carry.wheel_problems(tmp_path, ["a", "b"], image={"numpy": "1.26.4"})
    assert problems == ["a-1.0-py3-none-any.whl needs zzz>=1: zzz is neither carried nor installed",
                        "a-1.0-py3-none-any.whl needs b>=2: b is 1.2",
                        "a-1.0-py3-none-any.whl needs numpy>=2: numpy is 1.26.4"]
    _, problems = carry.wheel_problems(tmp_path, ["a", "b"], image={"numpy": None, "zzz": None})
    assert problems == ["a-1.0-py3-none-any.whl needs b>=2: b is 1.2"]  # an image version not known passes


@pytest.mark.parametrize("tag", ["cp311-cp311-manylinux_2_17_x86_64", "cp313-cp313-manylinux_2_17_x86_64",
                                 "cp312-cp312-manylinux_2_17_aarch64", "cp312-cp312-macosx_11_0_arm64",
                                 "py3-none-win_amd64", "cp313-abi3-manylinux_2_28_x86_64"])
def test_a_wheel_for_another_python_or_platform_is_refused(tmp_path, tag):
    wheel(tmp_path, "a", "1.0", tag=tag)
    _, problems = carry.wheel_problems(tmp_path, ["a"], image={})
    assert problems == [f"a-1.0-{tag}.whl: not for CPython 3.12 on manylinux x86-64"]


def test_the_carried_names_and_the_wheels_match(tmp_path):
    wheel(tmp_path, "a", "1.0")
    _, problems = carry.wheel_problems(tmp_path, ["a", "B_c"], image={})
    assert problems == ["b-c: carried, and no wheel of it: run `make gpu-wheels`"]
    _, problems = carry.wheel_problems(tmp_path, [], image={})
    assert problems == ["a-1.0-py3-none-any.whl: not a carried name"]


def test_top_level_import_names(tmp_path):
    files = ["google/auth/__init__.py", "google/auth/x.py", "google/oauth2/__init__.py", "six.py",
             "_cffi_backend.cpython-312-x86_64-linux-gnu.so", "cffi/__init__.py", "cffi.libs/libffi.so",
             "tests/__init__.py", "g-1.0.data/scripts/run"]
    w = carry.read_wheel(wheel(tmp_path, "g", "1.0", files=files))
    assert w.tops == ["_cffi_backend", "cffi", "google.auth", "google.oauth2", "six"]


def test_a_tree_and_folder_over_the_limit_are_refused(repo, tmp_path):
    (repo / "new.py").write_text("y" * 1000)  # untracked, not ignored: it travels
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_bytes(b"0" * 10**6)  # ignored: it stays
    folder = tmp_path / "carried"
    wheel(folder, "a", "1.0")
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text("t" * 2000)
    tree = len("ignored/\n") + 3000 + 1000  # .gitignore, code.py, new.py
    size = tree + sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    _, problems = carry.size_problem(repo, folder, limit=size)
    assert problems == []
    _, problems = carry.size_problem(repo, folder, limit=size - 1)
    assert len(problems) == 1 and problems[0].startswith("tree ") and "over the tool's" in problems[0]


def test_the_recorded_tree_says_what_changed_since(repo, tmp_path):
    record = tmp_path / "tree.json"
    carry.record_tree(repo, record)
    state = carry.recorded_state(record)
    head = git(repo, "rev-parse", "HEAD").strip()
    assert state(repo) == (head, [])
    (repo / "code.py").write_text("x = 2\n")
    assert state(repo) == (head, ["changed since the dry run: code.py"])
    (repo / "code.py").unlink()  # a file gone counts too
    assert state(repo) == (head, ["changed since the dry run: code.py"])


def test_the_check_params_parse_for_every_stage_it_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # it reads profiles/tiny.yaml and params.yaml as the device command runs it: from the root
    path = gpu_check._params(tmp_path, scale=32)
    blocks = {"prepare": prepare.PrepareParams, "sft": sft.SftParams, "generate": generate.GenerateParams,
              "label": label.LabelParams, "reference": reference.ReferenceParams,
              "guidance": guidance.GuidanceParams, "dpo": dpo.DpoParams}
    parsed = {name: config.load(cls, name, path) for name, cls in blocks.items()}
    common, p = parsed["prepare"]
    assert common.device == "cuda" and common.max_len == 128 and (p.n_train, p.n_sft) == (384, 384)
    assert [dpo.resolve(parsed["dpo"][1], v, str(path)).loss for v in ("dpo", "tgdpo")] == ["dpo", "tgdpo"]
    assert parsed["guidance"][1].sources["dpo"].kind == "dpo"


def test_the_model_config_is_smollm2_135m():
    """SMOLLM2_135M against the bundled SmolLM2-135M-Instruct GGUF's own metadata."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader

    from posttrain import modeling

    try:
        path = modeling.smollm2_dir() / modeling.SMOLLM2_GGUF
    except FileNotFoundError as e:
        pytest.skip(str(e))
    reader = GGUFReader(path)
    fields = reader.fields
    value = lambda key: fields[key].parts[fields[key].data[0]][0].item()  # noqa: E731
    c = gpu_check.SMOLLM2_135M
    assert len(fields["tokenizer.ggml.tokens"].data) == c["vocab_size"]
    assert value("llama.embedding_length") == c["hidden_size"]
    assert value("llama.feed_forward_length") == c["intermediate_size"]
    assert value("llama.block_count") == c["num_hidden_layers"]
    assert value("llama.attention.head_count") == c["num_attention_heads"]
    assert value("llama.attention.head_count_kv") == c["num_key_value_heads"]
    assert value("llama.context_length") == c["max_position_embeddings"]
    assert value("llama.rope.freq_base") == c["rope_parameters"]["rope_theta"]
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(c["rms_norm_eps"])
    assert "output.weight" not in {t.name for t in reader.tensors}  # the head is tied to the embedding


def test_the_device_command_in_docs_installs_where_dill_pickles_by_reference():
    """docs/gpu.md's one-line command for the device tool: under its 2000 characters, the wheels into a folder named
    site-packages (bench/gpu_check.py `_imports` says why), then the check writing into $OUT."""
    lines = (ROOT / "docs" / "gpu.md").read_text().splitlines()
    (line,) = [x for x in lines if x.startswith("python3 -m pip install")]
    assert len(line) <= 2000
    assert "--target /tmp/site-packages .whl/*.whl" in line and "export PYTHONPATH=/tmp/site-packages" in line
    assert "python3 -m bench.gpu_check --out $OUT/gpu_check.json" in line


def test_a_cpu_rehearsal_runs_every_part(tmp_path, monkeypatch):
    """The check's whole flow, on the CPU with a 2-layer model in SmolLM2-135M's place: every part runs, in order,
    and the results file carries each part's figures (the GPU run's memory figures are CUDA's alone)."""
    monkeypatch.chdir(ROOT)  # as the device command runs it
    monkeypatch.setattr(machine, "_started", None)  # require_clean notes HEAD for this run only
    for k, v in gpu_check.OFFLINE.items():
        monkeypatch.setenv(k, v)  # the run sets them if unset: restored after this test
    monkeypatch.setattr(gpu_check, "SMOLLM2_135M", gpu_check.SMOLLM2_135M | {
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2})
    carried = tmp_path / "carried"
    gpu_check.pack(carried)  # the tokenizer; no wheels: here every carried package is installed already
    out = tmp_path / "gpu_check.json"
    rc = gpu_check.main(["--device", "cpu", "--carried", str(carried), "--work", str(tmp_path / "work"), "--out",
                         str(out), "--scale", "4", "--steps", "2", "--repeats", "1", "--step-batch", "4"])
    r = json.loads(out.read_text())
    assert (rc, r["errors"]) == (0, {})
    assert set(r["parts"]) == {"imports", "base", "prepare", "sft", "generate", "label", "reference", "dpo",
                               "guidance", "tgdpo", "mlflow", "step_time"}
    assert r["parts"]["base"]["figures"]["parameters"] > 0 and r["parts"]["prepare"]["figures"]
    assert r["parts"]["mlflow"]["figures"]["checked"] == {n: ["FINISHED", "False"] for n in
                                                          ("sft", "dpo@dpo", "dpo@tgdpo")}
    step = r["parts"]["step_time"]["figures"]
    assert set(step["results"]) == {"dpo", "tgdpo", "trl_dpo_defaults"} and step["steps"] == 2
    assert not set(machine.PROVENANCE_KEYS) & set(step)  # the check's own provenance, once, at the top
    assert set(machine.PROVENANCE_KEYS) <= set(r) and len(r["git_revision"]) == 40
