"""dvc.yaml lists every repo file a stage's code runs: the import closure of its module inside posttrain/ and
stages/ (module-level and lazy imports in functions alike), so no code change leaves a stage's output stale."""

import ast
import re

import yaml

from tests.conftest import ROOT

PACKAGES = ("posttrain", "stages")


def _module_file(name: str):
    """The repo file of a dotted module name, or None when it is not one of ours (or is a package)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    path = ROOT.joinpath(*name.split(".")).with_suffix(".py")
    return path if path.is_file() else None


def imports(path) -> set:
    """Repo files imported anywhere in `path` (top level, functions, conditionals)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from posttrain import io` imports posttrain.io; `from posttrain.io import X` imports posttrain.io
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {f for f in map(_module_file, names) if f is not None}
    return found


def closure(path) -> set:
    seen, todo = set(), [path]
    while todo:
        p = todo.pop()
        if p not in seen:
            seen.add(p)
            todo += imports(p)
    return seen


def stages() -> dict:
    """Stage name -> (its entry module, its deps) from dvc.yaml (a foreach stage's `do` block)."""
    out = {}
    for name, st in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = st.get("do", st)
        module = re.search(r"python -m (stages\.\w+)", body["cmd"]).group(1)
        out[name] = (module, set(body["deps"]))
    return out


def test_dvc_yaml_deps_cover_each_stage_import_closure():
    missing, extra = {}, {}
    for name, (module, deps) in stages().items():
        files = {str(p.relative_to(ROOT)) for p in closure(_module_file(module))}
        if files - deps:
            missing[name] = sorted(files - deps)
        code = {d for d in deps if d.endswith(".py")}
        if code - files:  # a module the stage no longer imports would re-run it for nothing
            extra[name] = sorted(code - files)
    assert not missing, f"dvc.yaml deps miss files the stage imports: {missing}"
    assert not extra, f"dvc.yaml deps list modules the stage does not import: {extra}"


def test_closure_follows_lazy_and_transitive_imports():
    # stages/evaluate.py imports posttrain.cli at the top; cli imports posttrain.io only inside execute()
    files = {str(p.relative_to(ROOT)) for p in closure(ROOT / "stages/evaluate.py")}
    assert {"posttrain/cli.py", "posttrain/io.py", "posttrain/config.py", "posttrain/tracking.py"} <= files
    # posttrain.training imports posttrain.cli lazily (inside save and full_state_dict)
    assert ROOT / "posttrain/cli.py" in imports(ROOT / "posttrain/training.py")


def test_package_inits_hold_no_code():
    """__init__.py files run on every import but are left out of deps: they must stay a docstring and nothing else."""
    for pkg in PACKAGES:
        body = ast.parse((ROOT / pkg / "__init__.py").read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), (
            f"{pkg}/__init__.py has code: list it in every stage's dvc.yaml deps")
