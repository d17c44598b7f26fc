"""Supervised fine-tuning examples: rows of a file -> token ids with a mask of the tokens that
carry a loss (the response's, or every token with `loss_on_prompt`).

Two shapes of row, as TRL's `SFTTrainer` reads them:
- a prompt and a response (fields named by settings, default `prompt` and `response`): the ids
  are the prompt's, then the response's, then the end-of-text token. Prompt and response are
  tokenized apart, so the mask is exact (a joint encoding could merge a token across the seam);
- a list of chat messages (`{"role", "content"}`, default field `messages`), rendered with the
  tokenizer's own chat template (`apply_chat_template`, exactly what it renders); the assistant
  turns carry the loss. Which tokens are an assistant's is found by rendering each prefix of the
  conversation (the text up to the turn with the generation prompt, and the text through it):
  the characters between are the turn, its closing tag included, and the fast tokenizer's offsets
  map them to tokens. This works for any template that renders a conversation as the
  concatenation of its turns (every chat template we know); one that does not is refused in one
  line.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bigbatch.errors import UsageError


@dataclass(frozen=True)
class Fields:
    """Where a row keeps its parts (`data.prompt_field`, ...)."""

    prompt: str = "prompt"
    response: str = "response"
    messages: str = "messages"


@dataclass(frozen=True)
class Example:
    """One tokenized example: `ids` and, per id, whether it is a target of the loss."""

    ids: np.ndarray   # (n,) int64 token ids
    loss: np.ndarray  # (n,) bool: this token is predicted with a loss (the response's)
    answer: str | None = None  # the reference response, for exact-match evaluation
    prompt_length: int = 0     # ids before the (last) response: what generation starts from


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a .jsonl / .jsonl.gz / .json (a list) / .parquet file or a `datasets`
    save_to_disk directory."""
    if path.is_dir():
        try:
            import datasets
        except ImportError as err:
            raise UsageError(f"{str(path)!r} is a directory: SFT data directories are `datasets` "
                             "save_to_disk folders, which need the data extra (pip install "
                             "'bigbatch[data]')") from err
        try:
            loaded = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise UsageError(f"{str(path)!r} is not a `datasets` save_to_disk directory "
                             "(give a .jsonl, .json or .parquet file, or such a directory)") from err
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise UsageError(f"{str(path)!r} holds splits {', '.join(loaded)} and no 'train'")
            loaded = loaded["train"]
        return list(loaded)
    if not path.is_file():
        raise UsageError(f"SFT data {str(path)!r} is not a file: give a .jsonl, .json or "
                         ".parquet file, or a `datasets` save_to_disk directory")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            rows = []
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise UsageError(f"{str(path)!r} line {number} is not JSON: "
                                         f"{err.msg}") from err
        return rows
    if name.endswith(".json"):
        rows = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise UsageError(f"{str(path)!r} is not a JSON list of rows")
        return rows
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise UsageError(f"SFT data {str(path)!r} has an unknown format: use .jsonl, .jsonl.gz, "
                     ".json or .parquet, or a `datasets` save_to_disk directory")


def row_shape(rows: list[dict[str, Any]], fields: Fields, path: Path) -> str:
    """"pair" (prompt and response) or "chat" (messages), from the first row; every row must
    have the same."""
    if not rows:
        raise UsageError(f"SFT data {str(path)!r} holds no rows")
    first = rows[0]
    if not isinstance(first, dict):
        raise UsageError(f"SFT data {str(path)!r}: a row is {type(first).__name__}, not an object")
    if fields.messages in first:
        return "chat"
    if fields.prompt in first and fields.response in first:
        return "pair"
    raise UsageError(f"SFT data {str(path)!r} row 1 has neither {fields.messages!r} nor both "
                     f"{fields.prompt!r} and {fields.response!r}: its fields are "
                     f"{', '.join(map(str, first))} (data.messages_field, data.prompt_field and "
                     "data.response_field name them)")


def pair_texts(row: dict[str, Any], number: int, fields: Fields) -> tuple[str, str]:
    """A prompt/response row's two texts, checked."""
    parts = []
    for key in (fields.prompt, fields.response):
        if key not in row:
            raise UsageError(f"SFT row {number} has no field {key!r} (its fields: "
                             f"{', '.join(map(str, row))})")
        if not isinstance(row[key], str):
            raise UsageError(f"SFT row {number}: {key!r} is {type(row[key]).__name__}, not text")
        parts.append(row[key])
    prompt, response = parts
    if not response.strip():
        raise UsageError(f"SFT row {number} has an empty {fields.response!r}: every example "
                         "needs a response to learn (drop the row)")
    return prompt, response


def pair_example(response: str, prompt_ids: list[int], response_ids: list[int], eot_id: int,
                 loss_on_prompt: bool) -> Example:
    """A prompt/response row: prompt ids, response ids, end of text; the loss on the response
    and the end of text (the model learns to stop)."""
    ids = np.array([*prompt_ids, *response_ids, eot_id], dtype=np.int64)
    loss = np.zeros(len(ids), dtype=bool)
    loss[0 if loss_on_prompt else len(prompt_ids):] = True
    return Example(ids, loss, answer=response if prompt_ids else None,  # nothing to continue
                   prompt_length=len(prompt_ids))


def chat_example(row: dict[str, Any], number: int, fields: Fields, tokenizer: Any,
                 loss_on_prompt: bool) -> Example:
    """A messages row rendered by the tokenizer's chat template; the assistant turns carry the
    loss (the last assistant turn is the reference answer)."""
    messages = row.get(fields.messages)
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise UsageError(f"SFT row {number}: {fields.messages!r} must be a non-empty list of "
                         "{'role': ..., 'content': ...} messages")
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns or not any(str(messages[i]["content"]).strip() for i in turns):
        raise UsageError(f"SFT row {number} has no assistant message with content: every "
                         "example needs a response to learn (drop the row)")

    def render(upto: list[dict], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(upto, tokenize=False,
                                             add_generation_prompt=generation_prompt)

    text = render(messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.array(encoded["input_ids"], dtype=np.int64)
    loss = np.full(len(ids), loss_on_prompt, dtype=bool)
    starts = np.array([start for start, _ in encoded["offset_mapping"]])
    for i in turns:
        before, through = render(messages[:i], generation_prompt=True), render(messages[:i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise UsageError(f"the tokenizer's chat template does not render SFT row {number} "
                             "turn by turn (a prefix of the conversation renders differently "
                             "from the start of the whole): give prompt/response rows instead")
        loss |= (starts >= len(before)) & (starts < len(through))
    prompt_length = int(np.searchsorted(starts, len(before)))  # `before` is the last turn's
    return Example(ids, loss, answer=str(messages[turns[-1]]["content"]),
                   prompt_length=prompt_length)


ENCODE_BATCH = 4096  # texts per tokenizer call


def tokenize_rows(rows: list[dict[str, Any]], fields: Fields, tokenizer: Any, *,
                  shape: str, eot_id: int, loss_on_prompt: bool = False) -> list[Example]:
    """Every row as an `Example`. `tokenizer` is a Hugging Face tokenizer (`apply_chat_template`
    for chat rows) or a `tokenizers.Tokenizer` (prompt/response rows only)."""
    if shape == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError("the SFT data holds chat messages and the tokenizer has no chat "
                             "template: give a tokenizer with one (data.tokenizer or the model's "
                             "own), or prompt/response rows")
        return [chat_example(row, number, fields, tokenizer, loss_on_prompt)
                for number, row in enumerate(rows, 1)]
    texts = [pair_texts(row, number, fields) for number, row in enumerate(rows, 1)]
    examples = []
    # Batches of texts, not one call a row: a fast tokenizer encodes a batch in Rust across
    # threads (SST-2's 60K rows on a loaded 2-core CPU: 5.4 s one by one, 3.9 s batched).
    # Bounded so the id lists of a batch, not of the whole file, are Python lists at once.
    for start in range(0, len(texts), ENCODE_BATCH):
        chunk = texts[start:start + ENCODE_BATCH]
        prompts = encode_batch(tokenizer, [prompt for prompt, _ in chunk])
        responses = encode_batch(tokenizer, [response for _, response in chunk])
        examples += [pair_example(response, prompt_ids, response_ids, eot_id, loss_on_prompt)
                     for (_, response), prompt_ids, response_ids in zip(chunk, prompts, responses,
                                                                         strict=True)]
    return examples


def encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Each text's ids, no special tokens (a prompt and its response are encoded apart). A fast
    transformers tokenizer is asked through its `tokenizers` backend: the same ids, without the
    per-text Python conversion of `__call__` (measured: a third of the time on SST-2)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None and hasattr(tokenizer, "apply_chat_template"):  # a slow (Python) one
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    backend = backend or tokenizer  # or a `tokenizers.Tokenizer` itself
    return [encoded.ids for encoded in backend.encode_batch(texts, add_special_tokens=False)]
