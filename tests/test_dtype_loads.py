"""Every safetensors dtype torch has, loaded over gloo at worlds 2 and 3, bit for bit.

The checkpoints are written with safetensors' own ``save_file`` (FP4 as
``float4_e2m1fn_x2``, which safetensors stores as ``F4`` with the last
dimension doubled) and compared with its single-process ``load_file``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import distload
from ckpt import read_all
from dist import run_world
from distload.format.dtypes import CASTABLE, TORCH_DTYPES

TINY_MB = 1024 / (1 << 20)  # 1 KiB buckets: tensors split into segments and coalesced into buckets


def _random(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random bytes viewed as ``dtype`` (NaN patterns included: comparisons are of raw bytes)."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    n = int(torch.tensor(shape).prod().item()) if shape else 1
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def write_every_dtype(out: Path, n_files: int = 3) -> dict[str, torch.Tensor]:
    """Two tensors per torch-loadable safetensors dtype (one of them over a 1 KiB bucket), in ``n_files`` files."""
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(5)
    tensors = {}
    for i, (name, dt) in enumerate(sorted(TORCH_DTYPES.items())):
        tag = name.lower()
        tensors[f"small.{tag}"] = _random((3, 2) if i % 2 else (4,), dt, g)
        tensors[f"big.{tag}"] = _random((40, 50), dt, g)
    names = sorted(tensors)
    wmap = {}
    for f in range(n_files):
        fname = f"model-{f + 1:05d}-of-{n_files:05d}.safetensors"
        part = {k: tensors[k] for k in names[f::n_files]}
        save_file(part, str(out / fname))
        wmap.update({k: fname for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return tensors


def write_fp8(out: Path) -> None:
    """A DeepSeek-V3-style FP8 checkpoint: F8_E4M3 weights with F32 block scales, F32 norms, in 2 files."""
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(6)
    first, second = {}, {}
    for i, part in ((0, first), (1, second)):
        p = f"layers.{i}.mlp"
        part[f"{p}.up.weight"] = (torch.randn(64, 48, generator=g) * 3).to(torch.float8_e4m3fn)
        part[f"{p}.up.weight_scale_inv"] = torch.rand(1, 1, generator=g) + 0.5  # one 128x128 block
        part[f"{p}.down.weight"] = (torch.randn(48, 64, generator=g) * 3).to(torch.float8_e4m3fn)
        part[f"{p}.down.weight_scale_inv"] = torch.rand(1, 1, generator=g) + 0.5
        part[f"layers.{i}.norm.weight"] = torch.randn(48, generator=g)
    save_file(first, str(out / "model-00001-of-00002.safetensors"))
    save_file(second, str(out / "model-00002-of-00002.safetensors"))
    wmap = {k: "model-00001-of-00002.safetensors" for k in first}
    wmap.update({k: "model-00002-of-00002.safetensors" for k in second})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def described(sd: dict[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, bytes): what travels back from the ranks (torch cannot unpickle every dtype)."""
    return {k: (str(v.dtype), tuple(v.shape), raw(v)) for k, v in sd.items()}


def assert_bit_identical(got: dict[str, tuple], want: dict[str, torch.Tensor], what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ: {set(got) ^ set(want)}"
    for k, (dtype, shape, data) in described(want).items():
        assert got[k][:2] == (dtype, shape), f"{what} {k}: {got[k][:2]} != {(dtype, shape)}"
        assert got[k][2] == data, f"{what} {k}: bytes differ"


class Holder(nn.Module):
    """A module holding ``spec`` (name -> (shape, dtype)): floating dtypes as parameters, the rest as buffers."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        for name, (shape, dtype) in spec.items():
            *path, leaf = name.split(".")
            mod: nn.Module = self
            for part in path:
                mod = mod._modules.setdefault(part, nn.Module())
            if dtype.is_floating_point:
                mod.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False))
            else:
                mod.register_buffer(leaf, torch.zeros(shape, dtype=dtype))


def _spec(tensors: dict[str, torch.Tensor], model_dtype: torch.dtype | None = None) -> dict:
    """The model a user builds for these tensors (plain floats in ``model_dtype``, if given)."""
    return {k: (tuple(v.shape), model_dtype if model_dtype is not None and v.dtype in
                (torch.float16, torch.bfloat16, torch.float32, torch.float64) else v.dtype)
            for k, v in tensors.items()}




# ---- children (every rank) ------------------------------------------------------------


def _child_every_dtype(rank, world, path, spec):
    out = {}
    out["state_dict"] = described(distload.load_state_dict(path, bucket_mb=TINY_MB))
    out["state_dict_bf16"] = described(distload.load_state_dict(path, dtype=torch.bfloat16))
    with distload.empty_init():
        m = Holder(spec)
    distload.load_checkpoint(m, path, dtype=torch.bfloat16, bucket_mb=TINY_MB)
    out["model_bf16"] = described(m.state_dict())
    return out


def _child_fp8(rank, world, path, spec):
    out = {"state_dict": described(distload.load_state_dict(path, dtype=torch.bfloat16, bucket_mb=TINY_MB))}
    with distload.empty_init():
        m = Holder(spec)
    distload.load_checkpoint(m, path, dtype=torch.bfloat16, bucket_mb=TINY_MB)
    out["model"] = described(m.state_dict())
    out["param_dtypes"] = {k: str(p.dtype) for k, p in m.named_parameters()}
    # a bf16 model for an FP8 checkpoint is refused while planning, naming the key, on every rank
    bf16_spec = {k: (shape, torch.bfloat16) for k, (shape, _) in spec.items()}
    with distload.empty_init():
        wrong = Holder(bf16_spec)
    try:
        distload.load_checkpoint(wrong, path, dtype=torch.bfloat16)
        out["wrong"] = None
    except distload.DistLoadError as e:
        out["wrong"] = (e.phase, str(e), all(p.is_meta for p in wrong.parameters()))
    return out


def _child_int_into_float(rank, world, path, spec):
    with distload.empty_init():
        m = Holder(spec)
    try:
        distload.load_checkpoint(m, path)
    except distload.DistLoadError as e:
        return e.phase, str(e), all(p.is_meta for p in m.parameters())
    return None


# ---- tests ------------------------------------------------------------------------------


def _cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype, keep=frozenset()) -> dict[str, torch.Tensor]:
    castable = {TORCH_DTYPES[n] for n in CASTABLE}
    return {k: v.to(dtype) if v.dtype in castable and k not in keep else v for k, v in tensors.items()}


@pytest.mark.parametrize("world", [2, 3])
def test_every_dtype_loads_as_stored_bit_for_bit(world, tmp_path):
    path = tmp_path / "every"
    write_every_dtype(path)
    want = read_all(path)
    assert {v.dtype for v in want.values()} == set(TORCH_DTYPES.values())
    results = run_world(_child_every_dtype, world, str(path), _spec(want), timeout=240)
    for r, got in enumerate(results):
        assert_bit_identical(got["state_dict"], want, f"rank {r} state dict")
        # dtype= casts F16/BF16/F32/F64 only; FP8, FP4, integers, bool and complex arrive as stored
        assert_bit_identical(got["state_dict_bf16"], _cast(want, torch.bfloat16), f"rank {r} bf16 state dict")
        assert_bit_identical(got["model_bf16"], _cast(want, torch.bfloat16), f"rank {r} bf16 model")


def _fp8_case(path: Path) -> tuple[dict, dict[str, torch.Tensor], set[str]]:
    """An FP8 checkpoint with scales, the model spec a user builds for it (FP8 weights, F32 scales,
    norms in bf16), what a bf16 load must give, and the scale keys."""
    write_fp8(path)
    want = read_all(path)
    scales = {k for k in want if "scale" in k}
    spec = _spec(want, torch.bfloat16)
    spec.update({k: (tuple(want[k].shape), torch.float32) for k in scales})
    return spec, _cast(want, torch.bfloat16, keep=scales), scales


@pytest.mark.parametrize("world", [2, 3])
def test_fp8_with_scales_loads_as_stored_under_a_bf16_cast(tmp_path, world):
    path = tmp_path / "fp8"
    spec, expect, scales = _fp8_case(path)
    results = run_world(_child_fp8, world, str(path), spec, timeout=240)
    assert {str(v.dtype) for k, v in expect.items() if k in scales} == {"torch.float32"}
    for r, got in enumerate(results):
        assert_bit_identical(got["state_dict"], expect, f"rank {r} state dict")
        assert_bit_identical(got["model"], expect, f"rank {r} model")
        assert got["param_dtypes"]["layers.0.mlp.up.weight"] == "torch.float8_e4m3fn"
        assert got["param_dtypes"]["layers.1.mlp.down.weight_scale_inv"] == "torch.float32"
        phase, msg, all_meta = got["wrong"]
        assert phase == "plan" and all_meta
        assert "stores F8_E4M3 but the model holds torch.bfloat16" in msg and "'layers.0.mlp.down.weight'" in msg


def test_an_integer_tensor_into_a_float_parameter_fails_while_planning_naming_the_key(tmp_path):
    path = tmp_path / "ints"
    path.mkdir()
    save_file({"ids": torch.arange(6, dtype=torch.int64), "w": torch.ones(3)}, str(path / "model.safetensors"))
    spec = {"ids": ((6,), torch.float32), "w": ((3,), torch.float32)}
    results = run_world(_child_int_into_float, 2, str(path), spec, timeout=240)
    for phase, msg, all_meta in results:
        assert phase == "plan" and all_meta
        assert "tensor 'ids': the checkpoint stores I64 but the model holds torch.float32" in msg


def _child_fp8_fsdp(rank, world, path, spec):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for policy in ("scatter", "slice"):
        with distload.empty_init():
            m = Holder(spec)
        mesh = init_device_mesh("cpu", (world,))
        for layer in m.layers.children():
            fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
        distload.load_checkpoint(m, path, dtype=torch.bfloat16, read_policy=policy, bucket_mb=TINY_MB)
        # gloo cannot all-gather FP8: each rank returns its own shard's bytes
        out[policy] = described({k: v.to_local() for k, v in m.state_dict().items()})
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_fp8_with_scales_loads_into_fsdp2_shards_as_stored(tmp_path, world):
    path = tmp_path / "fp8"
    spec, expect, _ = _fp8_case(path)
    results = run_world(_child_fp8_fsdp, world, str(path), spec, timeout=240)
    for r, got in enumerate(results):
        # FSDP2 shards dim 0 as torch.chunk does
        mine = {k: v.chunk(world, 0)[r] if r < len(v.chunk(world, 0)) else v[:0] for k, v in expect.items()}
        for policy in ("scatter", "slice"):
            assert_bit_identical(got[policy], mine, f"rank {r} {policy}")
