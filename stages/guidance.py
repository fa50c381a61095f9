"""guidance: token-level reward guidance r_hat_t for TGDPO, one stage per source (`foreach` over guidance.sources).

    dvc repro guidance
    python -m stages.guidance --name dpo --model models/dpo/dpo --prefs data/label/prefs.jsonl \
        --reference data/reference --out data/guidance/dpo

Source kind `dpo` is the paper's practical recipe (seed 000): the induced DPO reward of a trained DPO model,
r_hat_t = log pi_hat(a_t | s_t) - log pi_ref(a_t | s_t), per completion token. Kind `token_reward` reads a learned
token-level reward model (the `token_reward` stage, seed 001). Writes `rhat.jsonl` (id, chosen: [r_hat per
token], rejected: [...]), computed once per data set and read by every TGDPO variant that names it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from posttrain import cli, config, io, modeling, preference, progress, reward


@dataclass
class Source:
    kind: Literal["dpo", "token_reward"] = "dpo"
    model: str = "models/dpo/dpo"
    """The trained model whose token rewards guide TGDPO (dvc.yaml passes it as --model)."""
    scale: float = 1.0
    """token_reward only: r_phi is standardised over the data set's tokens (its scale is arbitrary), then x scale."""


@dataclass
class GuidanceParams:
    sources: dict[str, Source] = field(default_factory=lambda: {"dpo": Source()})
    batch_size: int = 16


def run(common, params: GuidanceParams, args) -> dict:
    source = params.sources[args.name]
    pairs = io.read_jsonl(args.prefs, "prefs")
    ref = preference.read_token_values(Path(args.reference) / "logps.jsonl")
    device = modeling.device_for(common.device)
    causal = args.model if source.kind == "dpo" else reward.backbone(args.model)
    tok = modeling.stage_tokenizer(causal, padding_side="right")
    rows, _ = preference.encoded_rows(tok, pairs, common.max_len, args.prefs)
    rows = [r for r in rows if r["id"] in ref]
    if source.kind == "dpo":
        model = modeling.load_chain(args.model, device, common.trust_remote_code)
        hat = preference.completion_logps(model, tok, rows, params.batch_size)
        values = [{"id": h["id"], **{side: [a - b for a, b in zip(h[side], ref[h["id"]][side], strict=True)]
                                     for side in ("chosen", "rejected")}} for h in hat]
    else:
        values = _token_reward_values(args.model, tok, rows, params.batch_size, device, source.scale)
    flat = [x for v in values for side in ("chosen", "rejected") for x in v[side]]
    with io.atomic_dir(args.out) as tmp:
        preference.write_token_values(tmp / "rhat.jsonl", values)
    return {"pairs": len(values), "rhat_mean": sum(flat) / len(flat),
            "rhat_abs_max": max(abs(x) for x in flat)}


@torch.no_grad()
def _token_reward_values(path, tok, rows, batch_size: int, device, scale: float) -> list[dict]:
    from posttrain import token_reward  # transformers' Trainer: imported for this kind only

    model = reward.load_model(path, device)
    collate = preference.PairCollator(pad_token_id=tok.pad_token_id)
    out = []
    with progress.Progress("token rewards", len(rows), "pair") as bar:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            b = collate([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in chunk])
            r = token_reward.token_rewards(model, b)
            mask = b["completion_mask"].to(r.device).bool()
            n = len(chunk)
            out += [{"id": row["id"], "chosen": r[i][mask[i]].tolist(), "rejected": r[n + i][mask[n + i]].tolist()}
                    for i, row in enumerate(chunk)]
            bar.update(n, int(b["prompt_mask"].sum() + b["completion_mask"].sum()))
    flat = torch.tensor([x for v in out for side in ("chosen", "rejected") for x in v[side]])
    mean, std = float(flat.mean()), float(flat.std().clamp(min=1e-6))
    return [{"id": v["id"], **{side: [scale * (x - mean) / std for x in v[side]] for side in ("chosen", "rejected")}}
            for v in out]


def _block(args):
    common, params = config.load(GuidanceParams, "guidance", args.params)
    if args.name not in params.sources:
        raise config.ParamsError(f"{args.params}: guidance.sources: no source {args.name!r}; "
                                 f"known: {sorted(params.sources)}")
    return common, params


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--name", required=True, help="a key of guidance.sources")
    p.add_argument("--model", required=True, help="the guidance model")
    p.add_argument("--prefs", required=True, help="preference pairs (JSONL, schema `prefs`)")
    p.add_argument("--reference", required=True, help="the reference stage's folder (logps.jsonl)")
    p.add_argument("--out", required=True, help="output folder: rhat.jsonl")
    args = p.parse_args(argv)
    return cli.execute("guidance", GuidanceParams, args, run, run_name=f"guidance@{args.name}", block=_block)


if __name__ == "__main__":
    main()
