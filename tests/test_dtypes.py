"""Pure tests of distload/format/dtypes.py: the dtype table and the casting rule."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import _TYPES as SAFETENSORS_TORCH_TYPES

from distload import DistLoadError
from distload.format.dtypes import (
    CASTABLE,
    DTYPES,
    TORCH_DTYPES,
    kept_as_stored,
    nbytes,
    param_dtypes,
    plan_dtypes,
    target_dtype,
    torch_dtype,
)

BF16, F32 = torch.bfloat16, torch.float32


def test_the_table_agrees_with_safetensors_own_torch_mapping():
    for name, dt in SAFETENSORS_TORCH_TYPES.items():
        if dt is not None:
            assert TORCH_DTYPES[name] == dt, name
    assert TORCH_DTYPES["F8_E8M0"] == torch.float8_e8m0fnu
    assert TORCH_DTYPES["F4"] == torch.float4_e2m1fn_x2
    assert CASTABLE == {"F16", "BF16", "F32", "F64"}


def test_bytes_per_torch_element_match_torch():
    for name, dt in TORCH_DTYPES.items():
        assert DTYPES[name].itemsize == dt.itemsize, name


def test_sub_byte_sizes_count_bits():
    assert nbytes("F4", 24) == 12 and nbytes("F6_E2M3", 4) == 3
    with pytest.raises(ValueError, match="not a whole number of bytes"):
        nbytes("F4", 3)


def test_a_dtype_torch_lacks_names_the_key():
    with pytest.raises(DistLoadError, match=r"tensor 'w': dtype F6_E2M3 has no torch dtype"):
        torch_dtype("F6_E2M3", "w")
    with pytest.raises(DistLoadError, match=r"'w'.*F6_E3M2 has no torch dtype"):
        plan_dtypes({"w": "F6_E3M2", "b": "F32"}, None, None)


# ---- the casting rule ------------------------------------------------------------


@pytest.mark.parametrize("stored", sorted(CASTABLE))
def test_plain_floats_cast_to_dtype(stored):
    assert target_dtype("w", stored, F32, BF16) == BF16
    assert target_dtype("w", stored, None, BF16) == BF16  # a state dict
    assert target_dtype("w", stored, torch.float16, None) == torch.float16  # no dtype=: the model's wins


@pytest.mark.parametrize("stored", ["F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"])
def test_fp8_and_fp4_load_as_stored_whatever_dtype_says(stored):
    as_stored = TORCH_DTYPES[stored]
    assert target_dtype("w", stored, as_stored, BF16) == as_stored
    assert target_dtype("w", stored, None, BF16) == as_stored


def test_fp8_into_a_bf16_parameter_is_an_error_not_an_upcast():
    with pytest.raises(DistLoadError, match=r"'layer.weight'.*stores F8_E4M3 but the model holds torch.bfloat16"):
        target_dtype("layer.weight", "F8_E4M3", BF16, BF16)


@pytest.mark.parametrize("stored,current", [
    ("F32", torch.int64), ("BF16", torch.uint8), ("I64", F32), ("U8", BF16), ("BOOL", F32),
    ("F8_E4M3", torch.uint8), ("I32", torch.int64), ("C64", F32), ("F32", torch.float8_e4m3fn),
])
def test_float_and_integer_never_mix(stored, current):
    with pytest.raises(DistLoadError, match=rf"tensor 'k': the checkpoint stores {stored} but the model holds"):
        target_dtype("k", stored, current, BF16)


@pytest.mark.parametrize("stored", ["I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64", "BOOL", "C64"])
def test_other_dtypes_load_as_stored(stored):
    assert target_dtype("k", stored, TORCH_DTYPES[stored], BF16) == TORCH_DTYPES[stored]
    assert target_dtype("k", stored, None, BF16) == TORCH_DTYPES[stored]


def test_scales_beside_quantized_weights_stay_as_stored():
    stored = {
        "mlp.up.weight": "F8_E4M3", "mlp.up.weight_scale_inv": "F32",  # DeepSeek-V3
        "attn.q.weight": "U8", "attn.q.weight_scale": "F8_E4M3", "attn.q.weight_scale_2": "F32",  # NVFP4
        "attn.q.input_scale": "F32",
        "norm.weight": "F32", "norm.scale": "F32",  # no quantized sibling: an ordinary float
    }
    keep = kept_as_stored(stored)
    assert keep == {"mlp.up.weight_scale_inv", "attn.q.weight_scale_2", "attn.q.input_scale"}
    model = {k: (TORCH_DTYPES[d], True) for k, d in stored.items()}
    got = plan_dtypes(stored, model, BF16)
    assert got["mlp.up.weight_scale_inv"] == F32 and got["attn.q.input_scale"] == F32
    assert got["mlp.up.weight"] == torch.float8_e4m3fn and got["attn.q.weight_scale"] == torch.float8_e4m3fn
    assert got["norm.weight"] == BF16 and got["norm.scale"] == BF16
    assert plan_dtypes(stored, None, BF16)["mlp.up.weight_scale_inv"] == F32


def test_a_scale_lands_as_stored_even_in_a_parameter_built_in_bf16():
    assert target_dtype("x.weight_scale_inv", "F32", BF16, BF16, keep=True) == F32


def test_buffers_are_never_cast():
    got = plan_dtypes({"w": "F32", "running_mean": "F32"}, {"w": (F32, True), "running_mean": (F32, False)}, BF16)
    assert got == {"w": BF16, "running_mean": F32}


def test_dtype_must_be_a_plain_float():
    with pytest.raises(DistLoadError, match="not a dtype distload casts to"):
        target_dtype("w", "F32", F32, torch.float8_e4m3fn)


def test_param_dtypes_follow_the_rule_per_parameter_and_through_ties():
    emb = torch.nn.Parameter(torch.empty(2, 2, device="meta"))
    q = torch.nn.Parameter(torch.empty(2, 2, device="meta", dtype=torch.float8_e4m3fn))
    s = torch.nn.Parameter(torch.empty(1, device="meta"))
    missing = torch.nn.Parameter(torch.empty(1, device="meta"))
    named = [("embed.weight", emb), ("lm_head.weight", emb), ("q.weight", q), ("q.weight_scale_inv", s),
             ("extra", missing)]
    stored = {"lm_head.weight": "F32", "q.weight": "F8_E4M3", "q.weight_scale_inv": "F32"}
    want = param_dtypes(named, BF16, stored)
    assert [want(p) for p in (emb, q, s, missing)] == [BF16, torch.float8_e4m3fn, F32, BF16]
    old_rule = param_dtypes(named, BF16, None)
    assert old_rule(q) == BF16  # without a checkpoint: every floating parameter, as before
