"""Decoder-only transformer models (Llama / Qwen2 / GPT-2 families) and HF weight I/O."""
from jaxrlhf.models.config import ModelConfig, preset
from jaxrlhf.models.transformer import (KVCache, Transformer, gather_last, init_model,
                                        last_token_index, positions_from_mask)

__all__ = ["ModelConfig", "preset", "KVCache", "Transformer", "gather_last", "init_model",
           "last_token_index", "positions_from_mask"]
