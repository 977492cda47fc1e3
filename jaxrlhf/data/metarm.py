"""MetaRM's meta set (MOSS): unlabelled responses of a shifted policy, rows
{prompt, responses: [y_1, ..., y_k]} with k >= 2, read from a JSON / JSONL file or sampled
from an actor by the `rm` stage (`rm.meta_data` / `rm.meta_actor`), as a ranking-format
dataset whose ranks are never used."""
from __future__ import annotations

import dataclasses

from jaxrlhf.data.batching import PreparedDataset, tokenize_examples
from jaxrlhf.data.formats import make_report, read_rows


def read_meta_file(path: str) -> list[dict]:
    """Rows {prompt, responses: [str, ...]} (k >= 2, no labels) of a JSON / JSONL file."""
    out = []
    for row in read_rows(path):
        where = f"{row.file}:{row.line}"
        if row.error is not None:
            raise ValueError(f"{where}: {row.error[0]}: {row.error[1]}")
        v = row.value
        ok = (isinstance(v, dict) and isinstance(v.get("prompt"), str)
              and isinstance(v.get("responses"), list) and len(v["responses"]) >= 2
              and all(isinstance(r, str) for r in v["responses"]))
        if not ok:
            raise ValueError(f"{where}: a meta row must be {{prompt: str, responses: [str, "
                             "str, ...]}} with >= 2 responses")
        out.append({"prompt": v["prompt"], "responses": list(v["responses"])})
    if not out:
        raise ValueError(f"{path}: no meta rows")
    return out


def meta_dataset(examples, like: PreparedDataset, tokenizer) -> PreparedDataset:
    """A ranking-format dataset of meta rows (ranks all 0), tokenised with the options of
    `like` (the training data)."""
    k = max(len(e["responses"]) for e in examples)
    rows_in = [{"prompt": e["prompt"], "responses": e["responses"],
                "ranks": [0] * len(e["responses"])} for e in examples]
    o = dataclasses.replace(like.options, format="ranking", max_k=k)
    opts = dict(o.__dict__)
    opts.pop("prompt_buckets")
    report = make_report(o, "meta set", None)
    rows = tokenize_examples(rows_in, tokenizer, opts, report=report)
    return PreparedDataset(rows_in, rows, report, o, tokenizer)


def prompt_dataset(prompts, like: PreparedDataset, tokenizer) -> PreparedDataset:
    """A prompt-format dataset of the given prompt texts, tokenised with the options of
    `like` (the training data): what an actor samples the meta set from."""
    examples = [{"prompt": p} for p in prompts]
    opts = dict(like.options.__dict__)
    opts.pop("prompt_buckets")
    opts["format"] = "prompt"
    rows = tokenize_examples(examples, tokenizer, opts,
                             report=make_report(like.options, "meta prompts", None))
    return PreparedDataset(examples, rows, make_report(like.options, "meta", None),
                           dataclasses.replace(like.options, format="prompt"), tokenizer)
