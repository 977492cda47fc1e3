"""Data for jaxrlhf: formats, tokenizers, bucketed NumPy batches, the built-in synthetic task.

Pure NumPy / Python (no jax import): batches are dicts of NumPy arrays that the trainer
device_puts. Typical use:

    data = build_dataset(config.data, tokenizer="byte", workdir=workdir)   # load + tokenise
    it = data.iterator(batch_size, seed=seed, process_index=..., process_count=...)
    batch = next(it); state = it.state(); it.restore(state)

Batch keys per format are documented in `jaxrlhf.data.batching`; config fields in
`jaxrlhf.data.config`; file formats and bad-row reasons in `jaxrlhf.data.formats`; the task in
`jaxrlhf.data.synthetic` and SYNTHETIC.md.
"""
from jaxrlhf.data.batching import (LM_FORMATS, PROMPT_FORMATS, RANKING_FORMATS, BatchIterator,
                                   JointIterator,
                                   PreparedDataset, bucket_length, build_dataset, collate_for,
                                   collate_lm, collate_prompts, collate_ranking, fit_lengths,
                                   prompt_text, ranked_pairs, response_text,
                                   tokenize_examples)
from jaxrlhf.data.config import (FORMATS, DataOptions, default_data_config,
                                 default_synthetic_config, resolve_options)
from jaxrlhf.data.formats import (REJECTS_FILENAME, BadRowError, LoadReport, load_examples,
                                  normalize_row, read_rows, split_hh)
from jaxrlhf.data.synthetic import SyntheticTask
from jaxrlhf.data.tokenizer import (ByteTokenizer, HFTokenizer, Tokenizer,
                                    fallback_chat_template, load_tokenizer)

__all__ = [
    "BadRowError", "BatchIterator", "bucket_length", "build_dataset", "ByteTokenizer",
    "collate_for", "collate_lm", "collate_prompts", "collate_ranking", "DataOptions",
    "default_data_config", "default_synthetic_config", "fallback_chat_template", "fit_lengths",
    "FORMATS", "HFTokenizer", "JointIterator", "LM_FORMATS", "load_examples", "load_tokenizer", "LoadReport",
    "normalize_row", "PreparedDataset", "PROMPT_FORMATS", "prompt_text", "ranked_pairs",
    "RANKING_FORMATS", "read_rows", "REJECTS_FILENAME", "resolve_options", "response_text",
    "split_hh", "SyntheticTask", "tokenize_examples", "Tokenizer",
]
