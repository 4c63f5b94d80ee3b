"""Key mapping (distload.plan.keys), without processes: each mapped load equals from_pretrained bit for bit."""

from __future__ import annotations

import pickle

import pytest
import torch
from safetensors import safe_open
from torch import nn

import distload
from distload.model.convert import local_destinations
from distload.plan.keys import Box, build_key_map
from distload.model.place import materialize, write_flat
from distload.plan.shard import Placement, Sharding, layout_of
from keyckpt import (add_position_ids, bert_config, build, dinov2_config, header_shapes, llama_config,
                     mixtral_config, qwen3_moe_config, save)

transformers = pytest.importorskip("transformers")


def _read_all(ckpt) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _load_through(model: nn.Module, ckpt, key_map) -> nn.Module:
    """Fill ``model`` the way the loader does: each key in two flat halves into its view; gathered ops run."""
    targets = materialize(model, torch.device("cpu"), None, [])
    tensors = _read_all(ckpt)
    views = local_destinations(key_map, targets)
    for k, view in views.items():
        flat = tensors[k].reshape(-1)
        half = flat.numel() // 2
        write_flat(view, 0, flat[:half])
        write_flat(view, half, flat[half:])
    for g in key_map.gathered:
        for name, value in g.run({k: tensors[k] for k in g.sources}, model).items():
            targets[name].copy_(value)
    return model


def _empty(cls, cfg):
    with distload.empty_init():
        return cls(cfg)


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _same_output(a: nn.Module, b: nn.Module, **inputs) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        oa, ob = a(**inputs), b(**inputs)
    first = (lambda o: o[0] if isinstance(o, tuple) else (o.logits if hasattr(o, "logits") and o.logits is not None
                                                            else o.last_hidden_state))
    assert torch.equal(first(oa), first(ob))


IDS = torch.tensor([[1, 5, 9, 2, 77, 3]])


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_per_expert_keys_land_in_slices_of_the_fused_experts(tmp_path, kind):
    from transformers import MixtralForCausalLM, Qwen3MoeForCausalLM

    cls, cfg = {"mixtral": (MixtralForCausalLM, mixtral_config()),
                "qwen3_moe": (Qwen3MoeForCausalLM, qwen3_moe_config())}[kind]
    ckpt = save(build(cls, cfg), tmp_path / kind)
    shapes = header_shapes(ckpt)
    assert any(".experts.3." in k for k in shapes)  # transformers 5 writes one key per expert
    model = _empty(cls, cfg)
    km = build_key_map(model, shapes)
    assert (km.missing, km.unexpected, km.gathered) == ((), (), ())
    assert km.wanted == frozenset(shapes)
    fused = [r for r in km.routes.values() if r.box is not None]
    assert {r.target.rsplit(".", 1)[1] for r in fused} == {"gate_up_proj", "down_proj"}
    _load_through(model, ckpt, km)
    ref = cls.from_pretrained(ckpt)
    _same(model, ref)
    _same_output(model, ref, input_ids=IDS)


def test_mixtral_expert_box_is_its_half_of_gate_up(tmp_path):
    from transformers import MixtralForCausalLM

    cfg = mixtral_config()
    ckpt = save(build(MixtralForCausalLM, cfg), tmp_path / "m")
    km = build_key_map(_empty(MixtralForCausalLM, cfg), header_shapes(ckpt))
    i, h = cfg.intermediate_size, cfg.hidden_size
    w1 = km.routes["model.layers.1.block_sparse_moe.experts.3.w1.weight"]
    w3 = km.routes["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    w2 = km.routes["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert w1.target == w3.target == "model.layers.1.mlp.experts.gate_up_proj"
    assert w1.box == Box((3, 0, 0), (1, i, h), (0,))
    assert w3.box == Box((3, i, 0), (1, i, h), (0,))
    assert w2.box == Box((3, 0, 0), (1, h, i), (0,)) and w2.target.endswith("experts.down_proj")


def test_base_model_checkpoint_loads_into_causal_lm_with_tied_embeddings(tmp_path):
    from transformers import LlamaForCausalLM, LlamaModel

    cfg = llama_config(tie=True)
    ckpt = save(build(LlamaModel, cfg), tmp_path / "base")
    shapes = header_shapes(ckpt)
    assert "embed_tokens.weight" in shapes  # no "model." prefix
    model = _empty(LlamaForCausalLM, cfg)
    km = build_key_map(model, shapes)
    assert (km.missing, km.unexpected) == ((), ())
    assert km.routes["layers.0.mlp.up_proj.weight"].target == "model.layers.0.mlp.up_proj.weight"
    _load_through(model, ckpt, km)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ref = LlamaForCausalLM.from_pretrained(ckpt)
    _same(model, ref)
    _same_output(model, ref, input_ids=IDS)


def test_causal_lm_checkpoint_loads_into_base_model_ignoring_the_head(tmp_path):
    from transformers import LlamaForCausalLM, LlamaModel

    cfg = llama_config(tie=False)
    ckpt = save(build(LlamaForCausalLM, cfg), tmp_path / "lm")
    model = _empty(LlamaModel, cfg)
    km = build_key_map(model, header_shapes(ckpt))
    assert (km.missing, km.unexpected, km.ignored) == ((), (), ("lm_head.weight",))
    assert "lm_head.weight" not in km.wanted
    _load_through(model, ckpt, km)
    ref = LlamaModel.from_pretrained(ckpt)
    _same(model, ref)
    _same_output(model, ref, input_ids=IDS)


def test_stored_position_ids_are_ignored_and_never_read(tmp_path):
    from transformers import BertModel

    cfg = bert_config()
    ckpt = save(build(BertModel, cfg), tmp_path / "bert", shard="40KB")
    add_position_ids(ckpt, "embeddings.position_ids", cfg.max_position_embeddings)
    model = _empty(BertModel, cfg)
    km = build_key_map(model, header_shapes(ckpt))
    assert (km.missing, km.unexpected, km.ignored) == ((), (), ("embeddings.position_ids",))
    assert "embeddings.position_ids" not in km.wanted
    _load_through(model, ckpt, km)
    ref = BertModel.from_pretrained(ckpt)
    _same(model, ref)
    _same_output(model, ref, input_ids=IDS)


def test_split_conversion_runs_transformers_op_on_gathered_sources(tmp_path):
    from transformers import Dinov2Model

    cfg = dinov2_config()
    ckpt = save(build(Dinov2Model, cfg), tmp_path / "dino")
    model = _empty(Dinov2Model, cfg)
    km = build_key_map(model, header_shapes(ckpt))
    assert (km.missing, km.unexpected) == ((), ())
    fused = {g.sources: g.targets for g in km.gathered}
    assert fused[("encoder.layer.0.mlp.weights_in.weight",)] == (
        "encoder.layer.0.mlp.gate_proj.weight", "encoder.layer.0.mlp.up_proj.weight")
    assert all(g.op == "Chunk(dim=0)" for g in km.gathered)
    _load_through(model, ckpt, km)
    ref = Dinov2Model.from_pretrained(ckpt)
    _same(model, ref)
    _same_output(model, ref, pixel_values=torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0)))


def test_key_map_travels_as_a_pickle(tmp_path):
    from transformers import Dinov2Model

    cfg = dinov2_config()
    ckpt = save(build(Dinov2Model, cfg), tmp_path / "dino")
    km = build_key_map(_empty(Dinov2Model, cfg), header_shapes(ckpt))
    again = pickle.loads(pickle.dumps(km))
    assert again.routes == km.routes and [g.sources for g in again.gathered] == [g.sources for g in km.gathered]


def test_a_missing_expert_fails_naming_the_op_and_keys(tmp_path):
    from transformers import MixtralForCausalLM

    cfg = mixtral_config()
    ckpt = save(build(MixtralForCausalLM, cfg), tmp_path / "m")
    shapes = header_shapes(ckpt)
    del shapes["model.layers.0.block_sparse_moe.experts.4.w3.weight"]
    with pytest.raises(distload.DistLoadError, match=r"MergeModulelist\(dim=0\) \+ Concatenate\(dim=1\).*"
                                                     r"experts\.0\.w1\.weight"):
        build_key_map(_empty(MixtralForCausalLM, cfg), shapes)


def test_all_experts_missing_is_reported_missing_not_zero_filled(tmp_path):
    from transformers import Qwen3MoeForCausalLM

    cfg = qwen3_moe_config()
    ckpt = save(build(Qwen3MoeForCausalLM, cfg), tmp_path / "q")
    shapes = {k: v for k, v in header_shapes(ckpt).items() if "layers.1.mlp.experts." not in k}
    km = build_key_map(_empty(Qwen3MoeForCausalLM, cfg), shapes)
    assert km.missing == ("model.layers.1.mlp.experts.down_proj", "model.layers.1.mlp.experts.gate_up_proj")


def test_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    from transformers import LlamaForCausalLM

    cfg = llama_config()
    ckpt = save(build(LlamaForCausalLM, cfg), tmp_path / "l")
    shapes = header_shapes(ckpt)
    shapes["model.norm.weight"] = (31,)
    with pytest.raises(distload.DistLoadError, match=r"model\.norm\.weight: checkpoint \[31\] vs model"):
        build_key_map(_empty(LlamaForCausalLM, cfg), shapes)


class Titan(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok_embeddings = nn.Embedding(10, 4)
        self.output = nn.Linear(4, 10, bias=False)
        self.register_buffer("freqs", torch.ones(3), persistent=False)


@pytest.mark.parametrize("style", ["dict", "callable"])
def test_key_map_hook_renames_plain_models(style):
    hf = {"model.embed_tokens.weight": (10, 4), "lm_head.weight": (10, 4), "model.rotary.inv_freq": (2,)}
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "lm_head.weight": "output.weight"}
    hook = names if style == "dict" else (lambda k: names.get(k))
    km = build_key_map(Titan(), hf, key_map=hook)
    assert {k: r.target for k, r in km.routes.items()} == names
    assert km.missing == ()
    assert km.unexpected == (("model.rotary.inv_freq",) if style == "dict" else ())
    assert km.ignored == (() if style == "dict" else ("model.rotary.inv_freq",))


def test_plain_model_keys_map_to_themselves():
    km = build_key_map(Titan(), {"tok_embeddings.weight": (10, 4), "freqs": (3,), "extra": (1,)})
    assert km.identity
    assert (km.missing, km.unexpected, km.ignored) == (("output.weight",), ("extra",), ("freqs",))


def test_box_restricted_to_a_shard_matches_dtensor_chunking():
    """Expert e of a Shard(0) fused tensor: the rank holding row e gets all of it, in its local view."""
    full = torch.arange(5 * 6 * 4, dtype=torch.float32).view(5, 6, 4)
    world = 3
    layout = layout_of(full.shape, Sharding(tuple(range(world)), (world,), (Placement("shard", 0),)), world)
    for e in range(5):
        for half in (0, 1):
            box = Box((e, 3 * half, 0), (1, 3, 4), (0,))
            src_layout = box.restrict(layout)
            assert src_layout.shape == (3, 4)
            holders = [r for r in range(world) if src_layout.local_numel(r)]
            assert len(holders) == 1
            for r in range(world):
                a, b = layout.regions[r][0][0] if layout.regions[r][0] else (0, 0)
                local = full[a:b].clone()
                view = box.local_view(local, layout.regions[r])
                assert tuple(view.shape) == src_layout.local_shape(r)
                if r in holders:
                    assert torch.equal(view, full[e, 3 * half : 3 * half + 3])


def test_box_restricted_to_a_column_shard_splits_the_source():
    full = torch.arange(4 * 6 * 5, dtype=torch.float32).view(4, 6, 5)
    world = 2
    layout = layout_of(full.shape, Sharding((0, 1), (2,), (Placement("shard", 1),)), world)
    box = Box((2, 2, 0), (1, 3, 5), (0,))  # rows 2..4 of expert 2 straddle both ranks' Shard(1) pieces
    src = box.restrict(layout)
    assert [src.local_shape(r) for r in range(world)] == [(1, 5), (2, 5)]
    pieces = []
    for r in range(world):
        (a, b), = layout.regions[r][1]
        view = box.local_view(full[:, a:b].clone(), layout.regions[r])
        assert tuple(view.shape) == src.local_shape(r)
        pieces.append(view)
    assert torch.equal(torch.cat(pieces, 0), full[2, 2:5])


def test_dry_run_plan_shows_how_keys_map(tmp_path, monkeypatch):
    from transformers import Dinov2Model, MixtralForCausalLM

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    cfg = mixtral_config()
    ckpt = save(build(MixtralForCausalLM, cfg), tmp_path / "m")
    text = distload.plan_checkpoint(ckpt, model=_empty(MixtralForCausalLM, cfg)).describe()
    assert "keys: 2 key(s) renamed" in text  # block_sparse_moe.gate -> mlp.gate, one per layer
    assert "keys: 30 key(s) read straight into slices of 4 fused tensor(s)" in text
    cfg = dinov2_config()
    ckpt = save(build(Dinov2Model, cfg), tmp_path / "d")
    text = distload.plan_checkpoint(ckpt, model=_empty(Dinov2Model, cfg)).describe()
    assert "keys: Chunk(dim=0): encoder.layer.0.mlp.weights_in.weight -> encoder.layer.0.mlp.gate_proj.weight, " \
           "encoder.layer.0.mlp.up_proj.weight (gathered)" in text
