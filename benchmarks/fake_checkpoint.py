"""Write a DeepSeek-V3-sized (or Llama-70B-shaped) checkpoint made of headers only: sparse files, no tensor data.

    python -m benchmarks.fake_checkpoint OUT                     # 163 files, 91,991 tensors, ~688 GB apparent size
    python -m benchmarks.fake_checkpoint OUT --preset llama-70b  # 30 files, 723 tensors, ~141 GB apparent size

Key names, shapes and dtypes follow DeepSeek-V3's published checkpoint: FP8
(``F8_E4M3``) projection weights, each with its F32 ``weight_scale_inv`` of
128 x 128 blocks; BF16 norms, embeddings, router and output head; 61 layers of
which the first 3 are dense and the rest hold 256 routed experts and one
shared expert; layer 61 is the multi-token-prediction module. Each file is
truncated to its full size with only the header written, so it takes a few
hundred KB of disk and the planner sees exactly what it would see on the real
checkpoint. Its tensor bytes read as zeros: use it to plan (``--dry-run``),
never to load.

The ``llama-70b`` preset follows Llama-3-70B's published checkpoint: BF16,
80 layers of grouped-query attention (64 heads, 8 key-value heads of 128)
and a 28,672-wide MLP, a 128,256-token vocabulary, an untied output head,
in 30 files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from pathlib import Path

HIDDEN, VOCAB, DENSE_INTER, MOE_INTER = 7168, 129280, 18432, 2048
EXPERTS, LAYERS, DENSE_LAYERS, HEADS = 256, 61, 3, 128
Q_LORA, KV_LORA, NOPE, ROPE, V_DIM = 1536, 512, 128, 64, 128
BLOCK = 128  # FP8 scale block
FILES = 163
SIZES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def _fp8(name: str, rows: int, cols: int) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(f"{name}.weight", "F8_E4M3", (rows, cols)),
            (f"{name}.weight_scale_inv", "F32", (math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)))]


def _mlp(prefix: str, inter: int) -> list:
    return (_fp8(f"{prefix}.gate_proj", inter, HIDDEN) + _fp8(f"{prefix}.up_proj", inter, HIDDEN)
            + _fp8(f"{prefix}.down_proj", HIDDEN, inter))


def _layer(i: int, mtp: int) -> list:
    p = f"model.layers.{i}"
    out = [(f"{p}.input_layernorm.weight", "BF16", (HIDDEN,)),
           (f"{p}.post_attention_layernorm.weight", "BF16", (HIDDEN,))]
    a = f"{p}.self_attn"
    out += _fp8(f"{a}.q_a_proj", Q_LORA, HIDDEN)
    out += [(f"{a}.q_a_layernorm.weight", "BF16", (Q_LORA,))]
    out += _fp8(f"{a}.q_b_proj", HEADS * (NOPE + ROPE), Q_LORA)
    out += _fp8(f"{a}.kv_a_proj_with_mqa", KV_LORA + ROPE, HIDDEN)
    out += [(f"{a}.kv_a_layernorm.weight", "BF16", (KV_LORA,))]
    out += _fp8(f"{a}.kv_b_proj", HEADS * (NOPE + V_DIM), KV_LORA)
    out += _fp8(f"{a}.o_proj", HIDDEN, HEADS * V_DIM)
    if i < DENSE_LAYERS:
        return out + _mlp(f"{p}.mlp", DENSE_INTER)
    out += [(f"{p}.mlp.gate.weight", "BF16", (EXPERTS, HIDDEN)),
            (f"{p}.mlp.gate.e_score_correction_bias", "F32", (EXPERTS,))]
    for e in range(EXPERTS):
        out += _mlp(f"{p}.mlp.experts.{e}", MOE_INTER)
    out += _mlp(f"{p}.mlp.shared_experts", MOE_INTER)
    if i == mtp:  # the multi-token-prediction module
        out += [(f"{p}.embed_tokens.weight", "BF16", (VOCAB, HIDDEN)), (f"{p}.enorm.weight", "BF16", (HIDDEN,)),
                (f"{p}.hnorm.weight", "BF16", (HIDDEN,)), (f"{p}.eh_proj.weight", "BF16", (HIDDEN, 2 * HIDDEN)),
                (f"{p}.shared_head.norm.weight", "BF16", (HIDDEN,)),
                (f"{p}.shared_head.head.weight", "BF16", (VOCAB, HIDDEN))]
    return out


def deepseek_v3_tensors(layers: int = LAYERS) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every (name, dtype, shape) of the checkpoint, in file order (``layers`` < 61: a shallower copy)."""
    out = [("model.embed_tokens.weight", "BF16", (VOCAB, HIDDEN))]
    for i in range(layers + 1):
        out += _layer(i, layers)
    return out + [("model.norm.weight", "BF16", (HIDDEN,)), ("lm_head.weight", "BF16", (VOCAB, HIDDEN))]


L70_HIDDEN, L70_VOCAB, L70_INTER, L70_LAYERS, L70_KV, L70_FILES = 8192, 128256, 28672, 80, 1024, 30


def llama_70b_tensors(layers: int = L70_LAYERS) -> list[tuple[str, str, tuple[int, ...]]]:
    """Every (name, dtype, shape) of a Llama-3-70B-shaped checkpoint, in file order."""
    out = [("model.embed_tokens.weight", "BF16", (L70_VOCAB, L70_HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.input_layernorm.weight", "BF16", (L70_HIDDEN,)),
                (f"{p}.self_attn.q_proj.weight", "BF16", (L70_HIDDEN, L70_HIDDEN)),
                (f"{p}.self_attn.k_proj.weight", "BF16", (L70_KV, L70_HIDDEN)),
                (f"{p}.self_attn.v_proj.weight", "BF16", (L70_KV, L70_HIDDEN)),
                (f"{p}.self_attn.o_proj.weight", "BF16", (L70_HIDDEN, L70_HIDDEN)),
                (f"{p}.post_attention_layernorm.weight", "BF16", (L70_HIDDEN,)),
                (f"{p}.mlp.gate_proj.weight", "BF16", (L70_INTER, L70_HIDDEN)),
                (f"{p}.mlp.up_proj.weight", "BF16", (L70_INTER, L70_HIDDEN)),
                (f"{p}.mlp.down_proj.weight", "BF16", (L70_HIDDEN, L70_INTER))]
    return out + [("model.norm.weight", "BF16", (L70_HIDDEN,)), ("lm_head.weight", "BF16", (L70_VOCAB, L70_HIDDEN))]


PRESETS = {"deepseek-v3": (deepseek_v3_tensors, FILES, LAYERS), "llama-70b": (llama_70b_tensors, L70_FILES, L70_LAYERS)}


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return SIZES[dtype] * math.prod(shape)


def write_fake_checkpoint(out: Path, files: int | None = None, layers: int | None = None,
                          preset: str = "deepseek-v3") -> Path:
    """Write ``files`` sparse shards plus the index into ``out``; returns ``out``."""
    make, default_files, default_layers = PRESETS[preset]
    files = default_files if files is None else files
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = make(default_layers if layers is None else layers)
    total = sum(_nbytes(d, s) for _, d, s in tensors)
    target = total / files
    groups: list[list] = [[]]
    size = 0
    for t in tensors:  # consecutive runs of about total / files bytes each
        n = _nbytes(t[1], t[2])
        if groups[-1] and size + n > target * len(groups) and len(groups) < files:
            groups.append([])
        groups[-1].append(t)
        size += n
    weight_map = {}
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):06d}.safetensors"
        header, pos = {}, 0
        for tname, dtype, shape in group:
            n = _nbytes(dtype, shape)
            header[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            pos += n
            weight_map[tname] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + pos)  # sparse: the data section is a hole
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="deepseek-v3")
    p.add_argument("--files", type=int, default=None, help="default: the preset's (163, or 30 for llama-70b)")
    p.add_argument("--layers", type=int, default=None,
                   help="transformer layers (deepseek-v3: the MTP layer comes on top); default: the preset's")
    args = p.parse_args()
    out = write_fake_checkpoint(args.out, args.files, args.layers, args.preset)
    shards = sorted(out.glob("*.safetensors"))
    apparent = sum(f.stat().st_size for f in shards)
    disk = sum(os.stat(f).st_blocks * 512 for f in shards)
    tensors = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    print(f"{out}: {len(shards)} file(s), {len(tensors)} tensors, {apparent / 1e9:.1f} GB apparent, "
          f"{disk / 1e6:.1f} MB on disk")


if __name__ == "__main__":
    main()
