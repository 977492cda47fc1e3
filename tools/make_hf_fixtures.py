"""Builds the tiny Hugging Face reference checkpoints under tests/fixtures/hf/ (needs torch).

    python tools/make_hf_fixtures.py [--out tests/fixtures/hf] [--only qwen3,mistral]

Each fixture is a directory written by the model's own `save_pretrained` (float32) plus
`reference.npz` with the HF outputs that `tests/test_hf_io.py` compares against (the tests
themselves never import torch):

    tokens, mask                          an unpadded batch (mask all ones)
    logits                                [B,T,V] (causal LM) or [B,T] scores (score head
                                          applied at every position)
    padded_tokens, padded_mask            a LEFT-padded batch
    padded_logits                         HF outputs with the attention mask and
                                          position_ids = clip(cumsum(mask) - 1, 0) passed
                                          explicitly (what HF `generate` does)
    pooled_scores, padded_pooled_scores   sequence-classification models only: HF's own
                                          pooled score at the last non-pad token
    greedy_tokens                         the families in GREEDY: HF generate's greedy
                                          continuation (GREEDY_TOKENS) of the padded batch

HF initialises biases to zero and norms to one, and uses small init ranges; every parameter
is redrawn here (norm scales ~ 1 + noise, biases ~ noise) so the tests really check them.
`versions.json` records the torch/transformers versions used.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig,
                          GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          LlamaForSequenceClassification, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

SEED = 1234
PAD = 0  # pad id used in every padded batch; real tokens are drawn from [1, V)


def _fixtures():
    """name -> (model class, config, save kwargs)."""
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2)
    return {
        # (a) GQA, untied, llama3 rope scaling, saved in several shards.
        "llama_gqa_sharded": (LlamaForCausalLM, LlamaConfig(
            **common, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-5,
            rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                 low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16)),
            dict(max_shard_size="40KB")),
        # (b) tied embeddings, single file; attention/MLP biases on (Llama allows both).
        "llama_tied": (LlamaForCausalLM, LlamaConfig(
            **common, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
            mlp_bias=True, rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=500000.0)), {}),
        # (c) Qwen2: q/k/v biases, no o_proj bias.
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(
            **common, num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=1e-6,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0)), {}),
        # (d) GPT-2: LayerNorm, learned positions, gelu_new, Conv1D, tied.
        "gpt2": (GPT2LMHeadModel, GPT2Config(
            vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
            eos_token_id=2), {}),
        # (e) reward-model style: Llama sequence classification, one label, pad id set.
        "llama_seqcls": (LlamaForSequenceClassification, LlamaConfig(
            **common, num_key_value_heads=2, tie_word_embeddings=False, num_labels=1,
            pad_token_id=PAD, rms_norm_eps=1e-5), {}),
        # (f) Qwen3: per-head q/k RMSNorm, tied; layer 1 slides over a 4-token window (the
        # batches are 8-10 tokens long, so the window cuts).
        "qwen3": (Qwen3ForCausalLM, Qwen3Config(
            **common, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True,
            rms_norm_eps=1e-6, use_sliding_window=True, sliding_window=4, max_window_layers=1,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0)), {}),
        # (g) Mistral: every layer slides over a 3-token window.
        "mistral": (MistralForCausalLM, MistralConfig(
            **common, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
            rms_norm_eps=1e-5, sliding_window=3), {}),
        # (h) Gemma 2: (1 + w) norms before and after attention / MLP, GeGLU, sqrt(d) embedding
        # scale, query_pre_attn_scalar, attention and final soft-capping (small caps, so they
        # bite), layer 0 slides over 3 tokens, tied.
        "gemma2": (Gemma2ForCausalLM, Gemma2Config(
            **common, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
            query_pre_attn_scalar=16, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
            sliding_window=3, rope_parameters=dict(rope_type="default", rope_theta=10000.0)),
            {}),
        # (i) Gemma 3 (text): + q/k (1 + w) norms, sliding layers with their own RoPE base,
        # linear RoPE scaling on the global layers, 3 layers: sliding, sliding, full.
        "gemma3": (Gemma3ForCausalLM, Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3}, num_key_value_heads=2, head_dim=8,
            rms_norm_eps=1e-6, query_pre_attn_scalar=8, sliding_window=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={"full_attention": dict(rope_type="linear", factor=4.0,
                                                    rope_theta=1000000.0),
                             "sliding_attention": dict(rope_type="default",
                                                       rope_theta=10000.0)}), {}),
    }


def _randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Redraws every parameter with non-trivial values (tied parameters are visited once)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith(".bias"):
                value = 0.2 * noise
            elif "norm" in name or ".ln_" in name:
                value = 1.0 + 0.2 * noise
            elif "embed" in name or ".wte." in name or ".wpe." in name:
                value = 0.5 * noise
            else:
                value = 0.2 * noise
            p.copy_(value)


def _batches(vocab: int, rng: np.random.Generator):
    tokens = rng.integers(1, vocab, size=(2, 8)).astype(np.int32)
    mask = np.ones_like(tokens)
    lengths = [10, 7, 4]  # real tokens per row of the left-padded batch
    t = max(lengths)
    padded_tokens = np.full((len(lengths), t), PAD, np.int32)
    padded_mask = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(lengths):
        padded_tokens[row, t - n:] = rng.integers(1, vocab, size=n)
        padded_mask[row, t - n:] = 1
    return tokens, mask, padded_tokens, padded_mask


def _forward(model, tokens, mask):
    """Per-position outputs (logits or scores) with explicit positions, plus pooled scores."""
    ids = torch.as_tensor(tokens, dtype=torch.long)
    att = torch.as_tensor(mask, dtype=torch.long)
    pos = torch.clamp(torch.cumsum(att, -1) - 1, min=0)
    with torch.no_grad():
        if hasattr(model, "score"):  # sequence classification: score at every position
            base = model.base_model(input_ids=ids, attention_mask=att, position_ids=pos)
            per_pos = model.score(base.last_hidden_state)[..., 0]
            pooled = model(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, 0]
            return per_pos.numpy(), pooled.numpy()
        out = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
        return out.numpy(), None


GREEDY_TOKENS = 8
# Fixtures that also store HF's greedy continuation of the left-padded batch (the families
# whose sliding windows the 8 new tokens run past).
GREEDY = ("qwen3", "mistral", "gemma2", "gemma3")


def _greedy(model, tokens, mask):
    """greedy_tokens [B, GREEDY_TOKENS]: HF `generate` (no sampling, no early stop) from the
    left-padded batch."""
    gen = model.generation_config
    gen.eos_token_id = None   # no stop token: exactly GREEDY_TOKENS, nothing suppressed
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                             attention_mask=torch.as_tensor(mask, dtype=torch.long),
                             max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=PAD,
                             generation_config=gen)
    return out[:, tokens.shape[1]:].numpy().astype(np.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tests",
                                                      "fixtures", "hf"))
    parser.add_argument("--only", default="",
                        help="comma-separated fixture names to (re)build; default all")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    only = {n for n in args.only.split(",") if n}
    for index, (name, (cls, config, save_kw)) in enumerate(_fixtures().items()):
        if only and name not in only:
            continue
        torch.manual_seed(SEED + index)
        gen = torch.Generator().manual_seed(SEED + index)
        model = cls._from_config(config, attn_implementation="eager", dtype=torch.float32)
        model.eval()
        _randomise(model, gen)
        path = os.path.join(out, name)
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(path, **save_kw)
        tokens, mask, padded_tokens, padded_mask = _batches(
            config.vocab_size, np.random.default_rng(SEED + index))
        logits, pooled = _forward(model, tokens, mask)
        padded_logits, padded_pooled = _forward(model, padded_tokens, padded_mask)
        ref = dict(tokens=tokens, mask=mask, logits=logits, padded_tokens=padded_tokens,
                   padded_mask=padded_mask, padded_logits=padded_logits)
        if pooled is not None:
            ref.update(pooled_scores=pooled, padded_pooled_scores=padded_pooled)
        elif name in GREEDY:
            ref["greedy_tokens"] = _greedy(model, padded_tokens, padded_mask)
        np.savez_compressed(os.path.join(path, "reference.npz"), **ref)
        size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
        print(f"{name:20s} {size / 1024:7.1f} KiB  {sorted(os.listdir(path))}")
    path = os.path.join(out, "versions.json")
    here = {"torch": torch.__version__, "transformers": transformers.__version__}
    record = dict(here, seed=SEED)
    if only and os.path.exists(path):   # a partial rebuild: record the versions per fixture
        with open(path) as f:
            record = json.load(f)
        record.setdefault("fixtures", {}).update({name: here for name in sorted(only)})
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
