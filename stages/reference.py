"""reference: per-token log-probs of every preference pair under the reference model, computed once per data set.

    dvc repro reference
    python -m stages.reference --model models/sft --prefs data/label/prefs.jsonl \
        --step-prefs data/label/step_prefs.jsonl --out data/reference

Every `dpo@<variant>` reads this cache instead of running the reference model at each step (TRL's DPOTrainer
runs it every step unless told to precompute, and even then keeps only sequence sums, in memory). Writes
`logps.jsonl` (id, chosen: [logp per completion token], rejected: [...]) and `meta.json`; where `--step-prefs`
exists (label writes it only with `label.step_pairs` and at least one pair), the same for the step pairs in
`step_logps.jsonl`, which a `pairs: step` row of dpo reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain import cli, io, modeling, preference


@dataclass
class ReferenceParams:
    batch_size: int = 16
    """Pairs per forward pass (2x sequences)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def run(common, params: ReferenceParams, args) -> dict:
    pairs = io.read_jsonl(args.prefs, "prefs")
    device = modeling.device_for(common.device)
    tok = modeling.stage_tokenizer(args.model, padding_side="right")
    rows, dropped = preference.encoded_rows(tok, pairs, common.max_len, args.prefs)
    model = modeling.load_chain(args.model, device, common.trust_remote_code)
    values = preference.completion_logps(model, tok, rows, params.batch_size)
    steps, step_dropped = _step_logps(model, tok, common, params, args.step_prefs)
    with io.atomic_dir(args.out) as tmp:
        preference.write_token_values(tmp / "logps.jsonl", values)
        if steps is not None:
            preference.write_token_values(tmp / "step_logps.jsonl", steps)
        io.write_json(tmp / "meta.json", {"model": args.model, "pairs": len(values), "dropped": dict(dropped),
                                          "max_len": common.max_len} | ({} if steps is None else {
                                              "step_pairs": len(steps), "step_dropped": dict(step_dropped)}))
    return {"pairs": len(values), "mean_chosen_logp": sum(sum(v["chosen"]) for v in values) / len(values)} | {
        f"dropped_{k}": v for k, v in dropped.items()} | ({} if steps is None else {"step_pairs": len(steps)} | {
            f"step_dropped_{k}": v for k, v in step_dropped.items()})


def _step_logps(model, tok, common, params: ReferenceParams, path: str | None):
    """The step pairs' cached log-probs, or None where there is no step file (label.step_pairs off, or no pair)."""
    if path is None or not Path(path).exists():
        return None, {}
    rows, dropped = preference.encoded_rows(tok, io.read_jsonl(path, "prefs"), common.max_len, path)
    return preference.completion_logps(model, tok, rows, params.batch_size), dropped


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="the reference model (the policy DPO starts from)")
    p.add_argument("--prefs", required=True, help="preference pairs (JSONL, schema `prefs`)")
    p.add_argument("--step-prefs", help="step-level pairs (label's step_prefs.jsonl), cached only if the file exists")
    p.add_argument("--out", required=True, help="output folder: logps.jsonl, meta.json (and step_logps.jsonl)")
    return cli.execute("reference", ReferenceParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
