"""Checkpoints written by transformers' own save_pretrained, and the models they load into.

Tiny configs, several files each. Used by the key-mapping tests (pure and multi-rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHARD = "24KB"


def mixtral_config():
    from transformers import MixtralConfig

    return MixtralConfig(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=96, num_local_experts=5,
                         num_experts_per_tok=2, tie_word_embeddings=False)


def qwen3_moe_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(hidden_size=32, intermediate_size=40, moe_intermediate_size=20, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=96, num_experts=6,
                          num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                          tie_word_embeddings=False)


def llama_config(tie: bool = True, layers: int = 3):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=96, tie_word_embeddings=tie)


def bert_config():
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      vocab_size=96, max_position_embeddings=40, type_vocab_size=2)


def dinov2_config():
    from transformers import Dinov2Config

    return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        image_size=28, patch_size=14, use_swiglu_ffn=True)


def save(model, out: Path, shard: str = SHARD) -> Path:
    """``save_pretrained`` with a fixed seed's weights, in several files."""
    model.save_pretrained(out, max_shard_size=shard)
    return out


def build(cls, cfg, seed: int = 0):
    torch.manual_seed(seed)
    return cls(cfg)


def add_position_ids(ckpt: Path, key: str, n: int) -> None:
    """Store ``key`` as older transformers did when ``position_ids`` was a persistent buffer."""
    index_path = ckpt / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        fname = index["weight_map"][next(iter(index["weight_map"]))]
    else:
        index, fname = None, "model.safetensors"
    tensors = load_file(str(ckpt / fname))
    tensors[key] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    save_file(tensors, str(ckpt / fname), metadata={"format": "pt"})
    if index is not None:
        index["weight_map"][key] = fname
        index["metadata"].pop("total_size", None)
        index_path.write_text(json.dumps(index))


def header_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> shape, from the headers (what the coordinator sees)."""
    from distload.format.header import read_checkpoint

    return {t.name: tuple(t.shape) for f in read_checkpoint(ckpt).files for t in f.tensors}
