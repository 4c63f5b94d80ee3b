"""Write a Llama-architecture checkpoint with transformers' save_pretrained.

    python -m benchmarks.make_checkpoint OUT --preset demo     # ~20 MB, 4 shards
    python -m benchmarks.make_checkpoint OUT --preset 1.7GB    # the benchmark model

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
}


def make_checkpoint(out: Path, preset: str = "demo", seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    stamp = out / ".preset"
    if stamp.is_file() and stamp.read_text() == preset and (out / "config.json").is_file():
        return out
    hidden, layers, inter, vocab, heads, kv, shard, dtype = PRESETS[preset]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, vocab_size=vocab,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False)
    torch.manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)  # build in the target dtype: no fp32 copy of a big model
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    model.config.dtype = torch_dtype
    model.save_pretrained(out, max_shard_size=shard)
    stamp.write_text(preset)
    return out


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
