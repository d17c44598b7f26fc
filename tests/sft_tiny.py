"""A tiny SFT setting for tests: SST-2 rows as prompt/response pairs, a 300-token byte-level BPE
trained on them with an end-of-text token, and a 2-layer, 32-wide GPT-2 config beside it (no
downloads)."""

from __future__ import annotations

import csv

import pytest

from conftest import SHARED

SST2 = SHARED / "data" / "sst2" / "train.tsv"
EOT = "<|endoftext|>"


def sst2_rows(count: int, offset: int = 0) -> list[dict[str, str]]:
    if not SST2.is_file():
        pytest.fail(f"{SST2} is missing: tests need ../shared beside the project")
    with SST2.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[offset:offset + count]
    return [{"prompt": f"Review: {r['sentence'].strip()}\nSentiment:",
             "response": " positive" if r["label"] == "1" else " negative"} for r in rows]


def make_tiny(root):
    """(a tokenizer directory with an end-of-text token, a tiny GPT-2 config.json there)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [r["prompt"] + r["response"] for r in sst2_rows(2000)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.decoder = decoders.ByteLevel()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOT)
    tokenizer.save_pretrained(str(root))
    transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2,
                            n_head=2, eos_token_id=tokenizer.eos_token_id,
                            bos_token_id=tokenizer.eos_token_id).save_pretrained(str(root))
    return root, tokenizer
