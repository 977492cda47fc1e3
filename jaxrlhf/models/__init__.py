"""Decoder-only transformer models (Llama, Qwen2/3, Mistral, Gemma 2/3, GPT-2), HF weight I/O,
low-rank adapters (`jaxrlhf.models.lora`), and reward models as functions (one model or a
stacked ensemble: `jaxrlhf.models.reward`)."""
from jaxrlhf.models.config import ModelConfig, preset
from jaxrlhf.models.transformer import (KVCache, Transformer, gather_last, init_model,
                                        last_token_index, positions_from_mask)
from jaxrlhf.models.hf_io import config_from_hf, config_to_hf, load_hf, save_hf
from jaxrlhf.models.reward import (load_ensemble, member_rewards, sequence_rewards,
                                   stack_trees)

__all__ = ["ModelConfig", "preset", "KVCache", "Transformer", "gather_last", "init_model",
           "last_token_index", "positions_from_mask", "config_from_hf", "config_to_hf", "load_hf",
           "save_hf", "load_ensemble", "member_rewards", "sequence_rewards", "stack_trees"]
