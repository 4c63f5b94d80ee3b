"""Tiny transformers checkpoints that vLLM's CPU build runs, written with ``save_pretrained`` (sharded)."""

from __future__ import annotations

from pathlib import Path

import torch

# vLLM's CPU attention wants head_dim of 32 or more; 2 KV heads split over TP 2.
_COMMON = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, vocab_size=512, max_position_embeddings=256)


def write(kind: str, out: Path, shard: str = "300KB") -> Path:
    """``kind``: ``llama`` (tied embeddings), ``qwen2`` (untied, q/k/v biases), ``qwen3_moe`` (per-expert keys),
    or ``llama_12mb`` (a wider Llama, where the headers' reads are well under 1% of the bytes)."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_COMMON, tie_word_embeddings=True))
    elif kind == "llama_12mb":
        cfg = {**_COMMON, "hidden_size": 256, "intermediate_size": 1024, "head_dim": 64, "vocab_size": 8192}
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**cfg, tie_word_embeddings=True))
    elif kind == "qwen2":
        cfg = dict(_COMMON)
        cfg.pop("head_dim")
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**cfg, tie_word_embeddings=False))
    elif kind == "qwen3_moe":
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**_COMMON, num_experts=4, num_experts_per_tok=2,
                                                          moe_intermediate_size=64, decoder_sparse_step=1,
                                                          tie_word_embeddings=False))
    else:
        raise ValueError(kind)
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size=shard)
    return out
