"""merge: weight-space merges of the aligned model with its SFT model (mergekit), one stage per row of merge.models.

    dvc repro merge                    # every row
    dvc repro merge@wise_50            # one row
    python -m stages.merge --name wise_50 --aligned models/dpo/tgdpo --other models/sft --out models/merge/wise_50

Each row names a method of `METHODS` and `alpha`, how far it moves from the other endpoint (theta_0, the SFT
model) toward the aligned one (theta_1); alpha 0 and 1 are the endpoints themselves, evaluated already:
- linear, WiSE-FT (https://huggingface.co/papers/2109.01903): theta = (1 - alpha) * theta_0 + alpha * theta_1;
- slerp: per tensor, along the great circle from theta_0 to theta_1 at t = alpha (linear where nearly parallel);
- ties (https://huggingface.co/papers/2306.01708): theta_0 + alpha * trim(theta_1 - theta_0), keeping the
  `density` fraction of the alignment delta with the largest magnitude (one task vector: sign election is moot);
- dare (https://huggingface.co/papers/2311.03099): theta_0 + alpha * rescale(drop(theta_1 - theta_0)), keeping a
  random `density` fraction (seeded by common.seed), rescaled to the delta's L1 norm.

An endpoint that is a LoRA chain (chain.json) is first merged into its base (peft merge_and_unload) and saved as a
temporary full checkpoint; mergekit then streams both checkpoints tensor by tensor. Writes a safetensors checkpoint
with the tokenizer and chat template, `mergekit_config.yml` (mergekit's input, naming the stage's input folders
rather than the temporary merged ones), `merge.json` (method,
alpha, density, endpoints: read by `evaluate` and `report`) and `hyperparameters.yaml`.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from posttrain import cli, config, io, modeling, tracking


def _linear(aligned: str, other: str, row: MergeRow) -> dict:
    return {"merge_method": "linear", "parameters": {"normalize": False},
            "models": [{"model": other, "parameters": {"weight": 1.0 - row.alpha}},
                       {"model": aligned, "parameters": {"weight": row.alpha}}]}


def _slerp(aligned: str, other: str, row: MergeRow) -> dict:
    return {"merge_method": "slerp", "base_model": other, "parameters": {"t": row.alpha},
            "models": [{"model": other}, {"model": aligned}]}


def _delta(method: str) -> Callable[[str, str, MergeRow], dict]:
    """Task arithmetic on the one alignment delta theta_1 - theta_0, sparsified by `method`, scaled by alpha."""

    def build(aligned: str, other: str, row: MergeRow) -> dict:
        # normalize off: with one task vector, mergekit's default (TIES) would divide alpha back out
        return {"merge_method": method, "base_model": other, "parameters": {"normalize": False},
                "models": [{"model": aligned, "parameters": {"weight": row.alpha, "density": row.density}}]}

    return build


class Method(NamedTuple):
    build: Callable[[str, str, MergeRow], dict]
    """(aligned path, other path, row) -> the mergekit configuration."""
    sparse: bool
    """Reads `density`."""


# mergekit buffers one output shard in memory until it writes it: its default, 5B parameters, is 20 GB in fp32.
# 250M parameters is 1 GB; SmolLM2-135M stays one model.safetensors.
OUT_SHARD_PARAMS = 250_000_000

# the one list of merge methods: params validation, the error message and the tests read it
METHODS: dict[str, Method] = {
    "linear": Method(_linear, sparse=False),
    "slerp": Method(_slerp, sparse=False),
    "ties": Method(_delta("ties"), sparse=True),
    "dare": Method(_delta("dare_linear"), sparse=True),
}


@dataclass
class MergeRow:
    method: str = "linear"
    """A key of METHODS."""
    alpha: float = 0.5
    """0 = the other endpoint (SFT), 1 = the aligned model: the weight (linear), t (slerp) or the delta's scale."""
    density: float = 1.0
    """ties / dare only: the fraction of the alignment delta's entries kept."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is not one of {sorted(METHODS)}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0 < self.density <= 1:
            raise ValueError(f"density must be in (0, 1], got {self.density}")
        if self.density != 1 and not METHODS[self.method].sparse:
            raise ValueError(f"density applies to {sorted(m for m, v in METHODS.items() if v.sparse)} only, "
                             f"not {self.method!r}")


@dataclass
class MergeParams:
    aligned: str = "models/dpo/tgdpo"
    """The aligned endpoint, alpha 1 (dvc.yaml passes it as --aligned)."""
    other: str = "models/sft"
    """The other endpoint, alpha 0, and the base of the alignment delta (dvc.yaml passes it as --other)."""
    models: dict[str, MergeRow] = field(default_factory=lambda: {"wise_50": MergeRow()})
    """Row name -> merge; each becomes the DVC stage merge@<name> writing models/merge/<name>."""

    def __post_init__(self) -> None:
        bad = [n for n in self.models if not re.fullmatch(r"[A-Za-z0-9_-]+", n)]
        if bad:
            raise ValueError(f"row names {bad}: use letters, digits, _ and - only (a dot splits DVC's params keys)")


def materialise(path: str | Path, out: Path, trust_remote_code: bool) -> str:
    """A full checkpoint folder for a stage's model output: itself, or its LoRA chain merged and saved to `out`."""
    from transformers import AutoTokenizer

    base, adapters = modeling.model_chain(path)
    if not adapters:
        return str(base)
    model = modeling.load_model(base, adapters, trust_remote_code=trust_remote_code)
    model.save_pretrained(out, safe_serialization=True)
    del model
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(out)
    return str(out)


def mergekit_config(cfg: dict):
    """mergekit's validated configuration; fp32 arithmetic whatever the checkpoints' dtype."""
    from mergekit.config import MergeConfiguration

    return MergeConfiguration.model_validate({"dtype": "float32", **cfg})


def run_mergekit(cfg: dict, out: Path, device: str, seed: int, trust_remote_code: bool) -> None:
    """Run mergekit on local checkpoints, offline, streaming tensors from the safetensors files."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mergekit.io.tasks import LoaderCache
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    merge_config = mergekit_config(cfg)
    options = MergeOptions(device=device, random_seed=seed, trust_remote_code=trust_remote_code, quiet=True,
                           copy_tokenizer=True, write_model_card=False, safe_serialization=True,
                           out_shard_size=OUT_SHARD_PARAMS)
    try:
        run_merge(merge_config, str(out), options)
    finally:
        # mergekit caches one lazy loader per model path for the life of the process: drop ours (temp folders)
        for ref in merge_config.referenced_models():
            LoaderCache().loaders.pop(ref, None)


def _tensor_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    files = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            files |= dict.fromkeys(st.keys(), f)
    return files


def delta_fraction(merged: Path, aligned: Path, other: Path) -> float:
    """||theta - theta_0|| / ||theta_1 - theta_0|| over all tensors, read one tensor at a time (alpha, for linear)."""
    import torch
    from safetensors import safe_open

    files = [_tensor_files(p) for p in (merged, aligned, other)]
    num = den = 0.0
    for key in sorted(set(files[0]) & set(files[1]) & set(files[2])):
        t = []
        for fs in files:
            with safe_open(str(fs[key]), "pt") as st:
                t.append(st.get_tensor(key).float())
        num += float((t[0] - t[2]).pow(2).sum(dtype=torch.float64))
        den += float((t[1] - t[2]).pow(2).sum(dtype=torch.float64))
    return (num / den) ** 0.5 if den > 0 else 0.0


def run(common, row: MergeRow, args) -> dict:
    out = Path(args.out)
    device = modeling.device_for(common.device).type
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.inputs-") as inputs:
        aligned = materialise(args.aligned, Path(inputs) / "aligned", common.trust_remote_code)
        other = materialise(args.other, Path(inputs) / "other", common.trust_remote_code)
        with io.atomic_dir(out) as tmp:
            build = METHODS[row.method].build
            run_mergekit(build(aligned, other, row), tmp, device, common.seed, common.trust_remote_code)
            modeling.check_template(modeling.load_tokenizer(tmp))
            fraction = delta_fraction(tmp, Path(aligned), Path(other))
            # mergekit read temporary merged-LoRA folders: record the config with the stage outputs they came from
            io.write_text(tmp / "mergekit_config.yml", "# LoRA chains among these were merged into their base first "
                          "(stages/merge.py)\n" + mergekit_config(build(args.aligned, args.other, row)).to_yaml())
            info = {"name": args.name, **config.to_dict(row), "aligned": args.aligned, "other": args.other}
            io.write_json(tmp / "merge.json", info)
            tracking.write_hyperparameters(tmp, {"merge": config.to_dict(row), "name": args.name,
                                                 "aligned": args.aligned, "other": args.other,
                                                 "common": config.to_dict(common)})
    return {"alpha": row.alpha, "density": row.density, "delta_fraction": fraction,
            "size_mb": sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20}


def _block(args):
    common, params = config.load(MergeParams, "merge", args.params)
    if args.name not in params.models:
        raise config.ParamsError(f"{args.params}: merge.models: no row {args.name!r}; known: {sorted(params.models)}")
    return common, params.models[args.name]


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--name", required=True, help="a key of merge.models")
    p.add_argument("--aligned", required=True, help="the aligned model (alpha 1): checkpoint or adapter chain")
    p.add_argument("--other", required=True, help="the other endpoint (alpha 0, e.g. SFT): checkpoint or chain")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    args = p.parse_args(argv)
    return cli.execute("merge", MergeRow, args, run, run_name=f"merge@{args.name}", block=_block)


if __name__ == "__main__":
    main()
