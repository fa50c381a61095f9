"""Peak resident memory of the merge stage against the size on disk of one model it merges.

    python -m bench.merge_memory                            # models/dpo/tgdpo with models/sft, else see below
    python -m bench.merge_memory --aligned models/dpo/tgdpo --other models/sft --methods linear ties

The stage runs as a subprocess (`python -m stages.merge`, its own params file and MLflow store in a scratch
folder), its /proc/<pid>/status polled every 20 ms: peak RSS is its last VmHWM, peak anonymous memory the largest
RssAnon seen. RSS also counts the pages of the memory-mapped safetensors inputs, which the kernel can drop (page
cache); RssAnon is what the process itself holds. The child's ru_maxrss is not used: a child of a large parent
reports the parent's pages too (Linux keeps the pre-exec high-water mark).

Without the pipeline's models (they exist only after `dvc repro dpo@tgdpo`) it builds the same shapes from
`models/base` (or builds that with `stages.base` first): other = base + one random LoRA adapter (like models/sft),
aligned = base + that adapter + a second one (like a DPO adapter on SFT), both LoRA chains, so the stage merges
each into a full checkpoint before mergekit streams them. Also measured: the floor, a process that only imports
what the stage imports. Writes bench/results/merge_memory.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from bench import machine
from posttrain import config

ROOT = Path(__file__).resolve().parents[1]


def _status(pid: int) -> dict[str, float] | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            rows = dict(line.split(":", 1) for line in f if ":" in line)
        return {k: int(rows[k].split()[0]) / 1024 for k in ("VmHWM", "RssAnon")}
    except (OSError, KeyError, ValueError):
        return None


def _child(cmd: list[str]) -> dict:
    """Wall seconds, peak RSS and peak anonymous memory (MB) of one child process; exits if it fails."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    hwm = anon = 0.0
    while proc.poll() is None:
        s = _status(proc.pid)
        if s:
            hwm, anon = s["VmHWM"], max(anon, s["RssAnon"])  # VmHWM only grows while the process lives
        time.sleep(0.02)
    reader.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(lines)[-3000:]}")
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(hwm), "peak_anon_mb": round(anon)}


def checkpoint_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20


def _lora(base: Path, parents: list[Path], out: Path, seed: int) -> Path:
    """A random LoRA adapter (r 16, all linear layers, as sft/dpo train) on base + parents, with its chain.json."""
    import torch
    from peft import LoraConfig, get_peft_model

    from posttrain import modeling

    torch.manual_seed(seed)
    model = modeling.load_model(base, parents)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                             init_lora_weights=False))
    model.save_pretrained(out)
    chain = {"base": str(base), "adapters": [str(p) for p in parents] + [str(out)]}
    (out / "chain.json").write_text(json.dumps(chain, indent=2) + "\n")
    return out


def endpoints(args, work: Path) -> tuple[Path, Path, str]:
    if args.aligned and args.other:
        return Path(args.aligned), Path(args.other), "given"
    if (ROOT / "models/dpo/tgdpo/chain.json").exists() and (ROOT / "models/sft").exists():
        return ROOT / "models/dpo/tgdpo", ROOT / "models/sft", "pipeline"
    base = Path(args.base)
    if not (base / "config.json").exists():
        base = work / "base"
        print(f"building the base checkpoint into {base} (stages.base, params.yaml's common.model)")
        _child([sys.executable, "-m", "stages.base", "--params", str(work / "params.yaml"), "--out", str(base)])
    sft = _lora(base, [], work / "sft", seed=1)
    aligned = _lora(base, [sft], work / "aligned", seed=2)
    return aligned, sft, f"random LoRA chains on {base} (r 16, all-linear)"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--aligned", help="aligned model (checkpoint or chain); default models/dpo/tgdpo")
    p.add_argument("--other", help="other endpoint; default models/sft")
    p.add_argument("--base", default="models/base", help="base checkpoint for the fallback endpoints")
    p.add_argument("--methods", nargs="+", default=["linear"], help="keys of stages.merge.METHODS to measure")
    p.add_argument("--params", default="params.yaml", help="params file whose common block the stage runs with")
    p.add_argument("--out", default="bench/results/merge_memory.json")
    p.add_argument("--allow-dirty", action="store_true", help="write from a dirty git tree (recorded)")
    args = p.parse_args(argv)
    machine.require_clean(args.allow_dirty)
    from stages import merge

    with tempfile.TemporaryDirectory(prefix="merge_memory-") as tmp:
        work = Path(tmp)
        params = config.read_yaml(ROOT / args.params)
        params["common"]["mlflow_uri"] = f"sqlite:///{work / 'mlflow.db'}"
        params["merge"]["models"] = {m: {"method": m, "alpha": 0.5} | ({"density": 0.5} if merge.METHODS[m].sparse
                                                                        else {}) for m in args.methods}
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        aligned, other, source = endpoints(args, work)
        floor = _child([sys.executable, "-c", "import mergekit.merge, peft, transformers, mlflow, stages.merge"])
        runs = []
        for method in args.methods:
            out = work / "merged" / method
            r = _child([sys.executable, "-m", "stages.merge", "--params", str(work / "params.yaml"), "--name", method,
                        "--aligned", str(aligned), "--other", str(other), "--out", str(out)])
            size = checkpoint_mb(out)
            r |= {"method": method, "model_mb": round(size), "rss_over_model": round(r["peak_rss_mb"] / size, 2),
                  "rss_above_floor_over_model": round((r["peak_rss_mb"] - floor["peak_rss_mb"]) / size, 2),
                  "anon_above_floor_over_model": round((r["peak_anon_mb"] - floor["peak_anon_mb"]) / size, 2)}
            runs.append(r)
            print(f"{method:<7} {r['wall_s']:6.1f} s  peak RSS {r['peak_rss_mb']:5d} MB (anon {r['peak_anon_mb']:5d})"
                  f"  one model {size:4.0f} MB: above the import floor {r['rss_above_floor_over_model']:.2f}x "
                  f"(anon {r['anon_above_floor_over_model']:.2f}x)")
    result = {"endpoints": source, "aligned": str(aligned), "other": str(other),
              "import_floor": floor, "runs": runs}
    result = machine.write_results(args.out, result, machine.module_command("bench.merge_memory", argv),
                                   args.allow_dirty)
    print(f"import floor: RSS {floor['peak_rss_mb']} MB, anon {floor['peak_anon_mb']} MB; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
