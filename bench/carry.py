"""What travels to the lent device machine (docs/gpu.md), and whether it fits: the wheels its image lacks, for its
Python, each need of each met; the tree plus the carried folder within the device tool's 64 MiB; and a record of the
tree (HEAD, its dirty lines, each file's hash) for the copy there, which has no .git.

    wheels, problems = carry.wheel_problems(Path(".whl"), carried=gpu_check.CARRIED)
    sizes, problems = carry.size_problem(Path("."), Path(".whl"))

bench/gpu_check.py is the check that carries them; tests/test_gpu_check.py tests these on hand-made wheels.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import subprocess
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from bench import machine

IMAGE = dict.fromkeys("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub
humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping
jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime
onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec
patsy peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest python-dateutil pytorch-lightning pyyaml regex requests
rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece
sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp""".split()) | {
    "accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
    "tokenizers": "0.23.2", "torch": "2.11.0", "transformers": "5.17.0"}
"""The GPU image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17) -> version where a session's
pip list gave one, else None (only the name is checked)."""

TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "platform_machine": "x86_64",
          "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "extra": ""}
"""The environment markers of the image's python3, for the wheels' conditional needs."""

LIMIT = 64 * 2**20
"""What the device tool carries per call: the tree (tracked and untracked-not-ignored files) plus `carry`."""


@dataclass
class Wheel:
    file: str
    name: str
    version: str
    requires: list[Requirement]
    tops: list[str]
    """Its top-level import names (`_tops`)."""
    fits: bool
    """Installable on CPython 3.12, manylinux x86-64."""


def _fits(tag) -> bool:
    py = tag.interpreter in ("py3", "py312", "cp312") or (
        tag.abi == "abi3" and re.fullmatch(r"cp3\d+", tag.interpreter) and int(tag.interpreter[3:]) <= 12)
    platform = tag.platform == "any" or (tag.platform.startswith("manylinux") and tag.platform.endswith("_x86_64"))
    return bool(py) and tag.abi in ("none", "abi3", "cp312") and platform


def read_wheel(path: Path) -> Wheel:
    name, version, _, tags = parse_wheel_filename(path.name)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        meta = HeaderParser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode())
    requires = [r for r in map(Requirement, meta.get_all("Requires-Dist") or [])
                if r.marker is None or r.marker.evaluate(TARGET)]
    return Wheel(path.name, canonicalize_name(name), str(version), requires, _tops(set(names)),
                 any(map(_fits, tags)))


def _tops(names: set[str]) -> list[str]:
    """A wheel's top-level import names: its modules, and its shallowest packages (opentelemetry.sdk below a
    namespace package)."""
    tops = set()
    for parts in (n.split("/") for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))):
        if len(parts) == 1:  # x.py, x.cpython-312-x86_64-linux-gnu.so
            tops.add(parts[0].split(".")[0])
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) + "/__init__.py" in names:
                tops.add(".".join(parts[:i]))
                break
    return sorted(t for t in tops if not t.startswith(("test", "__pycache__")))


def wheel_problems(folder: Path, carried, image: dict | None = None) -> tuple[dict[str, Wheel], list[str]]:
    """The wheels in `folder` by name, and what is wrong with the set: a wheel for another Python or platform, two
    versions of one distribution, a `carried` name without its wheel or a wheel not named there, and a need met by
    neither a wheel nor `image` (default `IMAGE`), or met at a version it excludes, where the version is known."""
    image = IMAGE if image is None else image
    wheels: dict[str, Wheel] = {}
    problems = []
    for path in sorted(folder.glob("*.whl")):
        w = read_wheel(path)
        if not w.fits:
            problems.append(f"{w.file}: not for CPython 3.12 on manylinux x86-64")
        if w.name in wheels:
            problems.append(f"{w.name}: two versions ({wheels[w.name].file}, {w.file}): keep one, or pip stops")
        wheels[w.name] = w
    wanted = {canonicalize_name(n) for n in carried}
    problems += [f"{n}: carried, and no wheel of it: run `make gpu-wheels`" for n in sorted(wanted - set(wheels))]
    problems += [f"{wheels[n].file}: not a carried name" for n in sorted(set(wheels) - wanted)]
    available = {**image, **{n: w.version for n, w in wheels.items()}}
    return wheels, problems + need_problems(wheels.values(), available)


def need_problems(wheels, available: dict[str, str | None]) -> list[str]:
    """Each need of `wheels` missing from `available` (name -> version, None where unknown) or excluded by its
    version specifier."""
    problems = []
    for w in wheels:
        for r in w.requires:
            name = canonicalize_name(r.name)
            if name not in available:
                problems.append(f"{w.file} needs {r}: {name} is neither carried nor installed")
            elif available[name] is not None and not r.specifier.contains(available[name], prereleases=True):
                problems.append(f"{w.file} needs {r}: {name} is {available[name]}")
    return problems


def tree_files(root: Path) -> list[str]:
    """What the device tool sends of the tree: tracked and untracked-not-ignored files that exist."""
    out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard"], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return sorted({f for f in out.split("\0") if f and (root / f).is_file()})


def size_problem(root: Path, folder: Path, limit: int = LIMIT) -> tuple[dict, list[str]]:
    """(the sizes in MiB, [a problem if the tree of `root` and the carried `folder` together pass `limit`])."""
    tree = sum((root / f).stat().st_size for f in tree_files(root))
    carried = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    sizes = {"tree_mib": round(tree / 2**20, 2), "carried_mib": round(carried / 2**20, 2),
             "total_mib": round((tree + carried) / 2**20, 2), "limit_mib": round(limit / 2**20, 2)}
    too_big = tree + carried > limit
    return sizes, [f"tree {sizes['tree_mib']} MiB + {folder.name} {sizes['carried_mib']} MiB = "
                   f"{sizes['total_mib']} MiB, over the tool's {sizes['limit_mib']} MiB"] if too_big else []


def import_problems(modules) -> list[str]:
    """`import m: error` for each of `modules` that fails to import."""
    problems = []
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # reported by module name; the next module is still tried
            problems.append(f"import {m}: {type(e).__name__}: {str(e)[:300]}")
    return problems


def _sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def record_tree(root: Path, record: Path) -> None:
    """HEAD, the dirty lines and every travelling file's hash (results files aside), for `recorded_state` there."""
    sha, dirty = machine.git_state(root)
    files = {f: _sha256(root / f) for f in tree_files(root) if not f.startswith(machine.RESULTS_DIR)}
    record.write_text(json.dumps({"git_revision": sha, "dirty": dirty, "files": files}, indent=1))


def recorded_state(record: Path):
    """`machine.git_state` for a copy of the tree without .git: HEAD as recorded, dirty as recorded plus each
    recorded file whose bytes changed since."""
    rec = json.loads(record.read_text())

    def git_state(repo: str | Path = ".") -> tuple[str, list[str]]:
        changed = [f"changed since the dry run: {f}" for f, h in rec["files"].items() if _sha256(Path(repo) / f) != h]
        return rec["git_revision"], rec["dirty"] + changed

    return git_state


