"""The data and model `configs/sft-sst2.toml` fine-tunes: SST-2 as prompt/response rows and a
small GPT-2 configuration with the GPT-2 tokenizer, all from ../shared (nothing downloaded).

    python benchmarks/make_sft_data.py [--out runs/sft-sst2]

Writes OUT/train.jsonl and OUT/val.jsonl (rows {"prompt": "Review: <sentence>\\nSentiment:",
"response": " positive" | " negative"}: the held-out answers are scored by exact match),
OUT/model/config.json (a 4-layer, 256-wide GPT-2) and OUT/model/ the GPT-2 byte-level BPE
(tokenizer files; its end-of-text token ends every response).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
LABELS = {"0": " negative", "1": " positive"}


def rows(tsv: Path) -> list[dict[str, str]]:
    with tsv.open(newline="", encoding="utf-8") as f:
        return [{"prompt": f"Review: {row['sentence'].strip()}\nSentiment:",
                 "response": LABELS[row["label"]]}
                for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def write_jsonl(path: Path, items: list[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(item) + "\n" for item in items), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "sft-sst2")
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    args = parser.parse_args(argv)
    sst2, bpe = SHARED / "data" / "sst2", SHARED / "models" / "gpt2-bpe"
    if not (sst2 / "train.tsv").is_file() or not (bpe / "vocab.json").is_file():
        sys.exit(f"{sst2} or {bpe} is missing: the script needs ../shared beside the project")
    from transformers import AutoTokenizer, GPT2Config

    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", rows(sst2 / "train.tsv"))
    write_jsonl(args.out / "val.jsonl", rows(sst2 / "dev.tsv"))
    model = args.out / "model"
    model.mkdir(exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(bpe / name, model / name)
    tokenizer = AutoTokenizer.from_pretrained(str(model))  # fast: writes tokenizer.json
    tokenizer.save_pretrained(str(model))
    GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=args.d_model,
               n_layer=args.n_layer, n_head=4, bos_token_id=tokenizer.eos_token_id,
               eos_token_id=tokenizer.eos_token_id).save_pretrained(str(model))
    print(f"wrote {args.out}/train.jsonl, val.jsonl and model/ (GPT-2 config + tokenizer)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
