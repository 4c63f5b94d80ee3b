"""Pure checks of the transfer loop's parts: placement writes, buffer pools, the schedule (no processes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distload
from distload.transport.comm import LocalComm
from distload.errors import DistLoadError
from distload.format.header import ShardFile, TensorEntry
from distload.model.place import Placement, tied_duplicates, write_flat
from distload.plan.keys import alias_groups
from distload.plan.load_plan import build_plan
from distload.plan.items import RankInfo
from distload.io.reader import BufferPool
from distload.plan.shard import Placement as MeshPlacement
from distload.plan.shard import Sharding, layout_of
from distload.plan.shard_plan import build_shard_plan
from distload.plan.schedule import BROADCAST, SCATTER, SLICE, schedule


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("first,count", [(0, 24), (5, 9), (3, 1), (7, 12), (0, 8), (11, 13)])
def test_a_flat_element_range_lands_in_a_non_contiguous_view(first, count):
    fused = torch.zeros(3, 4, 6)  # e.g. experts x rows x (gate|up) columns
    view = fused[1, :, 2:]  # one expert's 'up' half: 4 x 4, not contiguous
    assert not view.is_contiguous()
    values = torch.arange(100, 100 + count, dtype=torch.float32)
    count = min(count, view.numel() - first)
    write_flat(view, first, values[:count])
    want = torch.zeros(view.numel())
    want[first : first + count] = values[:count]
    assert torch.equal(view.reshape(-1), want)
    rest = fused.clone()
    rest[1, :, 2:] = 0
    assert not rest.any(), "nothing outside the view was touched"


def test_commit_fills_a_non_contiguous_destination_from_byte_segments_with_a_cast():
    source = torch.randn(4, 5)
    fused = torch.zeros(4, 8, dtype=torch.bfloat16)
    view = fused[:, 3:]  # not contiguous
    place = Placement({"w": view}, {"w": "F32"})
    assert place.resolve("w", 0, 16, torch.device("cpu")) is None, "a strided view never takes bytes in place"
    raw = _bytes(source)
    for start in range(0, raw.numel(), 24):  # bucket-sized segments of the tensor's bytes
        place.commit("w", start, raw[start : start + 24])
    assert torch.equal(view, source.to(torch.bfloat16))
    assert not fused[:, :3].any()


def test_resolve_gives_the_destinations_own_bytes_only_when_nothing_needs_converting():
    t = torch.zeros(6, dtype=torch.float32)
    place = Placement({"a": t, "b": torch.zeros(6, dtype=torch.bfloat16)}, {"a": "F32", "b": "F32"})
    got = place.resolve("a", 4, 8, torch.device("cpu"))
    assert got is not None and got.data_ptr() == t.data_ptr() + 4
    assert place.resolve("b", 0, 8, torch.device("cpu")) is None, "a cast goes through commit"
    assert place.resolve("a", 0, 8, torch.device("meta")) is None, "another device goes through commit"


def test_a_pool_refuses_a_buffer_larger_than_it_holds():
    pool = BufferPool(1, 64, torch.device("cpu"))
    assert pool.acquire(64).numel() == 64
    with pytest.raises(DistLoadError, match="65-byte buffer"):
        BufferPool(1, 64, torch.device("cpu")).acquire(65)
    assert pool.allocated_bytes == 64


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(3, 2)
        self.head = nn.Linear(2, 3, bias=False)
        self.head.weight = self.embed.weight


def test_empty_init_keeps_weights_tied_by_assignment_tied():
    with distload.empty_init():
        model = _Tied()
    assert model.head.weight is model.embed.weight and model.head.weight.is_meta


def test_tied_weights_stored_twice_load_the_parameters_own_name():
    model = _Tied()
    assert alias_groups(model)["head.weight"] == ("embed.weight", "head.weight")
    assert tied_duplicates(model, {"embed.weight", "head.weight"}) == {"head.weight"}
    assert tied_duplicates(model, {"head.weight"}) == set(), "an alias alone still fills the tensor"


def test_empty_init_keeps_buffers_real_and_parameters_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    with distload.empty_init():
        model = LlamaForCausalLM(cfg)
    assert all(p.is_meta for p in model.parameters())
    inv = dict(model.named_buffers())["model.rotary_emb.inv_freq"]
    assert not inv.is_meta and torch.equal(inv, LlamaForCausalLM(cfg).model.rotary_emb.inv_freq)


def _file(name: str, tensors: list[tuple[str, tuple[int, ...]]]) -> ShardFile:
    entries, pos = [], 0
    for tname, shape in tensors:
        n = 4
        for d in shape:
            n *= d
        entries.append(TensorEntry(tname, "F32", tuple(shape), pos, pos + n))
        pos += n
    return ShardFile(name, 8 + pos, 8, tuple(entries))


def test_a_tensor_on_a_two_rank_submesh_is_sent_to_its_own_ranks_only():
    files = (_file("a.safetensors", [("w", (8, 4)), ("v", (8, 4))]),)
    sub = Sharding((0, 1), (2,), (MeshPlacement("shard", 0),))  # ranks 0 and 1 of a world of 4
    other = Sharding((2, 3), (2,), (MeshPlacement("shard", 0),))
    layouts = {"w": layout_of((8, 4), sub, 4), "v": layout_of((8, 4), other, 4)}
    sp = build_shard_plan(files, (0,), layouts, world_size=4, bucket_bytes=1 << 20, read_policy="scatter")
    (chunk,) = sp.scatters  # neighbours coalesce whatever their mesh: each message goes to its holders
    by_rank = chunk.parts_by_rank()
    assert sorted(by_rank) == [0, 1, 2, 3]
    assert {r: [p.name for p in parts] for r, parts in by_rank.items()} == {0: ["w"], 1: ["w"], 2: ["v"], 3: ["v"]}
    assert chunk.send_bytes == sp.send_bytes == 2 * 8 * 4 * 4, "every byte once: no padding, no outsider"
    assert chunk.wire_bytes == 2 * 8 * 4 * 4 - 4 * 4 * 4, "all but the owner's own half of w"


def test_the_schedule_lists_broadcasts_then_scatters_then_slices():
    import dataclasses

    files = (_file("a.safetensors", [("p", (4,)), ("w", (8, 4)), ("s", (4, 1024))]),)
    ranks = [RankInfo(r, "h", r) for r in range(2)]
    from distload.format.header import Checkpoint

    ckpt = Checkpoint("/x", files, (), ())
    plan = build_plan(ckpt, ranks, bucket_mb=1, wanted={"p"})
    mesh = Sharding((0, 1), (2,), (MeshPlacement("shard", 1),))
    rows = Sharding((0, 1), (2,), (MeshPlacement("shard", 0),))
    layouts = {"w": layout_of((8, 4), mesh, 2), "s": layout_of((4, 1024), rows, 2)}
    sp = build_shard_plan(plan.files, plan.owners, layouts, world_size=2, bucket_bytes=plan.bucket_bytes,
                          read_policy="slice")
    steps = schedule(dataclasses.replace(plan, sharded=sp))
    kinds = [s.kind for s in steps]
    assert kinds == [BROADCAST] + [SCATTER] * len(sp.scatters) + [SLICE] * len(sp.slices)
    assert len(sp.scatters) == 1 and len(sp.slices) == 2


def test_rank_0s_bar_counts_every_planned_byte_whatever_slices_it_reads_itself():
    import dataclasses

    from distload.format.header import Checkpoint
    from distload.transfer.loop import _Progress

    files = (_file("a.safetensors", [("p", (4,)), ("s", (4, 1024)), ("t", (5, 512))]),)
    ranks = [RankInfo(r, "h", r) for r in range(3)]
    plan = build_plan(Checkpoint("/x", files, (), ()), ranks, bucket_mb=1, wanted={"p"})
    rows = Sharding((0, 1), (2,), (MeshPlacement("shard", 0),))  # rank 2 holds neither: no slices
    layouts = {"s": layout_of((4, 1024), rows, 3), "t": layout_of((5, 512), rows, 3)}  # t: 3 rows and 2
    sp = build_shard_plan(plan.files, plan.owners, layouts, world_size=3, bucket_bytes=plan.bucket_bytes,
                          read_policy="slice")
    full = dataclasses.replace(plan, sharded=sp)
    assert not sp.slices_of(2) and sp.slices_of(0) and sp.slices_of(1)
    for rank in range(3):
        steps = schedule(full, rank)
        counter = _Progress(full, steps)
        counts = [counter.step(s) for s in steps] + [counter.rest()]
        assert min(counts) >= 0 and sum(counts) == plan.total_bytes + sp.total_bytes, rank


def test_a_single_process_load_uses_the_same_loop(tmp_path):
    from safetensors.torch import save_file

    sd = {"a": torch.randn(300, 7), "b": torch.arange(5)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    from distload.loader import _Load

    job = _Load(LocalComm(torch.device("cpu")), torch.device("cpu"), tmp_path, True, 0.001, False,
                model=None, dtype=torch.bfloat16)  # the cast makes every read go through the pool
    report = job.run()
    assert torch.equal(job.state_dict["a"], sd["a"].to(torch.bfloat16))
    assert torch.equal(job.state_dict["b"], sd["b"])
    assert 0 < report.buffer_bytes <= 2 * 1024, "two bucket buffers at most on one CPU rank"
