"""reference: per-token log-probs of every preference pair under the reference model, computed once per data set.

    dvc repro reference
    python -m stages.reference --model models/sft --prefs data/label/prefs.jsonl --out data/reference

Every `dpo@<variant>` reads this cache instead of running the reference model at each step (TRL's DPOTrainer
runs it every step unless told to precompute, and even then keeps only sequence sums, in memory). Writes
`logps.jsonl` (id, chosen: [logp per completion token], rejected: [...]) and `meta.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    with io.atomic_dir(args.out) as tmp:
        preference.write_token_values(tmp / "logps.jsonl", values)
        io.write_json(tmp / "meta.json", {"model": args.model, "pairs": len(values), "dropped": dict(dropped),
                                          "max_len": common.max_len})
    return {"pairs": len(values), "mean_chosen_logp": sum(sum(v["chosen"]) for v in values) / len(values)} | {
        f"dropped_{k}": v for k, v in dropped.items()}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="the reference model (the policy DPO starts from)")
    p.add_argument("--prefs", required=True, help="preference pairs (JSONL, schema `prefs`)")
    p.add_argument("--out", required=True, help="output folder: logps.jsonl, meta.json")
    return cli.execute("reference", ReferenceParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
