"""Write a Llama-architecture checkpoint with transformers' save_pretrained.

    python -m benchmarks.make_checkpoint OUT --preset demo     # ~20 MB, 4 shards
    python -m benchmarks.make_checkpoint OUT --preset 1.7GB    # the benchmark model
    python -m benchmarks.make_checkpoint OUT --preset 6GB      # the GPU benchmark model, written fast

Reuses OUT when it already holds a checkpoint of the same preset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PRESETS = {
    # name: (hidden, layers, intermediate, vocab, heads, kv_heads, shard, dtype)
    "tiny": (64, 2, 160, 1000, 4, 2, "100KB", "float32"),
    "smoke": (64, 2, 160, 1000, 4, 2, "100KB", "bfloat16"),  # the benchmark's smoke test
    "demo": (256, 4, 688, 8000, 8, 4, "8MB", "float32"),
    "quick": (1024, 4, 2816, 16000, 16, 16, "60MB", "bfloat16"),
    "1.7GB": (2048, 16, 5632, 32000, 16, 16, "500MB", "bfloat16"),
    "6GB": (3072, 28, 8192, 32000, 24, 8, "1600MB", "bfloat16"),  # 6.0 GB in 4 files, tiled
}
# Presets written as tiled random data straight through safetensors (seconds, not
# minutes of model init): the weights mean nothing, the bytes and layout are real.
TILED = {"6GB"}
TILE_ELEMS = (8 << 20) + 7  # one random bf16 tile (16 MiB); an odd length, so tensors differ


def make_checkpoint(out: Path, preset: str = "demo", seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .loaders import hf_dtype_kw

    out = Path(out)
    stamp = out / ".preset"
    if stamp.is_file() and stamp.read_text() == preset and (out / "config.json").is_file():
        return out
    hidden, layers, inter, vocab, heads, kv, shard, dtype = PRESETS[preset]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)
    if preset in TILED:
        _write_tiled(out, cfg, getattr(torch, dtype), _parse_size(shard), seed)
        stamp.write_text(preset)
        return out
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # build in the target dtype: no fp32 copy of a big model
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    setattr(model.config, hf_dtype_kw(), torch_dtype)
    model.save_pretrained(out, max_shard_size=shard)
    stamp.write_text(preset)
    return out


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9}
    return int(float(text[:-2]) * units[text[-2:]])


def _write_tiled(out: Path, cfg, dtype, shard_bytes: int, seed: int) -> None:
    """The model's state dict, shapes from a meta-device build, filled from one random tile.

    Writes ``model-0000i-of-0000n.safetensors`` with ``safetensors.torch.save_file``,
    a transformers ``model.safetensors.index.json`` and ``config.json``.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from .loaders import hf_dtype_kw

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    tile = torch.randn(TILE_ELEMS, generator=g).to(dtype)
    groups: list[list[str]] = [[]]
    size = 0
    for k, shape in shapes.items():
        n = dtype.itemsize * _numel(shape)
        if groups[-1] and size + n > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += n
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for j, k in enumerate(keys):
            n = _numel(shapes[k])
            start = (len(weight_map) + j) * 4099 % TILE_ELEMS
            reps = -(-(start + n) // TILE_ELEMS)
            flat = tile.repeat(reps)[start: start + n] if reps > 1 else tile[start: start + n]
            tensors[k] = flat.clone().view(shapes[k])
            total += n * dtype.itemsize
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    setattr(cfg, hf_dtype_kw(), dtype)
    cfg.save_pretrained(out)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    args = p.parse_args()
    out = make_checkpoint(args.out, args.preset)
    files = sorted(out.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    print(f"{out}: {len(files)} shard(s), {size / 1e6:.1f} MB")
    idx = out / "model.safetensors.index.json"
    if idx.is_file():
        json.loads(idx.read_text())


if __name__ == "__main__":
    main()
