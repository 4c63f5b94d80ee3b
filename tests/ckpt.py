"""Builders of small test checkpoints (a few MB at most)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """safetensors' own single-process read of every ``.safetensors`` file in a directory."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_llama(out: Path, *, tie: bool = True, shard: str = "200KB", hidden: int = 64, dtype=torch.float32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=tie, head_dim=16)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(out, max_shard_size=shard)
    return out


def write_synthetic(out: Path, n_files: int = 3) -> Path:
    """Sharded checkpoint of assorted dtypes/shapes with a valid index."""
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    specs = [
        ("big.weight", (300, 257), torch.float32),
        ("bf.weight", (129, 65), torch.bfloat16),
        ("half.bias", (77,), torch.float16),
        ("ids", (5, 3), torch.int64),
        ("mask", (10,), torch.bool),
        ("bytes", (33,), torch.uint8),
        ("scalar", (), torch.float32),
        ("empty", (0, 4), torch.float32),
        ("small.a", (3, 3), torch.float32),
        ("small.b", (7,), torch.int32),
    ]
    tensors = {}
    for name, shape, dt in specs:
        if dt.is_floating_point:
            t = torch.randn(shape, generator=g).to(dt)
        elif dt == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(0, 100, shape, generator=g).to(dt)
        tensors[name] = t
    names = list(tensors)
    weight_map = {}
    for i in range(n_files):
        part = names[i::n_files]
        fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(out / fname))
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return out


def write_bert(out: Path, *, shard: str = "100KB") -> Path:
    """A tiny BertForMaskedLM (tied decoder, non-persistent position_ids) in 2 shards."""
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(out, max_shard_size=shard)
    return out


def write_sized(out: Path, sizes_kib: list[int], *, total_size: bool = True) -> Path:
    """One fp32 tensor (plus a small bias) per file, each file about ``sizes_kib[i]`` KiB.

    For tests that need files large enough to tell apart by byte counts.
    """
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(2)
    weight_map: dict[str, str] = {}
    total = 0
    for i, kib in enumerate(sizes_kib):
        fname = f"model-{i + 1:05d}-of-{len(sizes_kib):05d}.safetensors"
        tensors = {f"layer{i}.weight": torch.randn(kib, 256, generator=g),
                   f"layer{i}.bias": torch.randn(5, generator=g)}
        save_file(tensors, str(out / fname))
        weight_map.update({k: fname for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    meta = {"total_size": total} if total_size else {}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": meta, "weight_map": weight_map}))
    return out


def st_bytes(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None,
             header_override: dict | None = None) -> bytes:
    """Hand-assemble a safetensors file: name -> (dtype, shape, raw bytes), in the given order."""
    header: dict = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if header_override:
        header.update(header_override)
    hb = json.dumps(header).encode()
    return len(hb).to_bytes(8, "little") + hb + data
