"""FSDP2 (fully_shard) models: each rank gets exactly its shards, bit for bit, under every read policy."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import distload
from ckpt import write_llama
from dist import run_world

POLICIES = ("scatter", "slice", "auto")


class Odd(nn.Module):
    """Sizes no world size of 2, 3 or 4 divides, plus tied weights and a computed buffer."""

    def __init__(self, hidden: int = 13):
        super().__init__()
        self.emb = nn.Embedding(11, hidden)
        self.l1 = nn.Linear(hidden, 7)
        self.norm = nn.LayerNorm(7)
        self.l2 = nn.Linear(7, 5)
        self.head = nn.Linear(hidden, 11, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.arange(5, dtype=torch.float32), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.l2(self.norm(self.l1(h))) * self.scale + self.head(h)[..., :5]


def write_odd(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {k: v.contiguous() for k, v in Odd().state_dict().items() if k not in ("head.weight", "scale")}
    save_file(sd, str(path))
    return load_file(str(path))


def _fsdp_odd(world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with distload.empty_init():
        model = Odd()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model.l1, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _load_odd(world, path, policy, dtype=None):
    model = _fsdp_odd(world)
    report = distload.load_checkpoint(model, path, bucket_mb=0.0002, read_policy=policy, dtype=dtype)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    local = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items()}
    return full, local, report.to_dict()


def _train_step(world, path):
    torch.manual_seed(1)
    ids = torch.randint(0, 11, (4, 6))
    model = _fsdp_odd(world)
    distload.load_checkpoint(model, path, bucket_mb=0.0002)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(ids).square().mean()
    loss.backward()
    opt.step()
    return loss.item(), {k: v.full_tensor() for k, v in model.state_dict().items()}


def _odd_world(rank, world, path):
    """Every FSDP2 load of the Odd model one world needs; world 3 also tries each policy, a cast and training."""
    out = {"auto": _load_odd(world, path, "auto")}
    if world == 3:
        for policy in ("scatter", "slice"):
            out[policy] = _load_odd(world, path, policy)
        out["bf16"] = _load_odd(world, path, "slice", torch.bfloat16)
        out["train"] = _train_step(world, path)
    return out


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    """(reference state dict, {world: per-rank results}); one process world per size for the module."""
    path = tmp_path_factory.mktemp("odd") / "odd.safetensors"
    ref = write_odd(path)
    return ref, {world: run_world(_odd_world, world, str(path)) for world in (2, 3, 4)}


@pytest.mark.parametrize("world", [2, 3, 4])
def test_fsdp2_full_tensors_equal_a_single_process_read_with_uneven_shards(odd, world):
    ref, runs = odd
    for rank, res in enumerate(runs[world]):
        full, local, report = res["auto"]
        assert full.keys() == {*ref, "head.weight"}
        for k, v in ref.items():
            assert torch.equal(full[k], v), k
            rows = torch.chunk(torch.empty(v.shape[0]), world)
            want = rows[rank].shape[0] if rank < len(rows) else 0
            assert local[k][0] == want, (k, local[k])  # DTensor's own uneven chunking
        assert torch.equal(full["head.weight"], ref["emb.weight"])  # still tied
        assert report["local_bytes"] == sum(v.element_size() * v[0].numel() * local[k][0] for k, v in ref.items())


def test_every_read_policy_gives_identical_shards(odd):
    ref, runs = odd
    out = runs[3]
    for policy in POLICIES:
        assert set(out[0][policy][2]["read_policy"].values()) == ({"slice"} if policy == "slice" else {"scatter"})
        for res in out:
            for k, v in ref.items():
                assert torch.equal(res[policy][0][k], v), (policy, k)


def test_slice_policy_reads_only_each_ranks_own_bytes(odd):
    _, runs = odd
    for res in runs[3]:
        report = res["slice"][2]
        assert report["bytes_read"] == report["local_bytes"] and report["chunks"] == 0


def test_scatter_policy_reads_every_byte_once_on_the_owner(odd):
    ref, runs = odd
    reads = [res["scatter"][2]["bytes_read"] for res in runs[3]]
    assert sorted(reads)[:-1] == [0, 0] and sum(reads) == sum(v.numel() * v.element_size() for v in ref.values())


def test_fsdp2_load_casts_to_the_requested_dtype(odd):
    ref, runs = odd
    for res in runs[3]:
        full = res["bf16"][0]
        for k, v in ref.items():
            assert full[k].dtype == torch.bfloat16 and torch.equal(full[k], v.to(torch.bfloat16)), k


def test_training_step_after_fsdp2_load_matches_an_unsharded_step(odd):
    ref, runs = odd
    torch.manual_seed(1)
    ids = torch.randint(0, 11, (4, 6))
    single = Odd()
    single.load_state_dict({**ref, "head.weight": ref["emb.weight"]})
    opt = torch.optim.SGD(single.parameters(), lr=0.1)
    loss = single(ids).square().mean()
    loss.backward()
    opt.step()
    for res in runs[3]:
        got_loss, after = res["train"]
        assert got_loss == pytest.approx(loss.item(), rel=1e-6)
        for k, v in single.state_dict().items():
            torch.testing.assert_close(after[k], v, rtol=1e-5, atol=1e-6)
            assert not torch.equal(after[k], ref.get(k, ref["emb.weight"])), f"{k} did not train"


def _llama_logits(rank, world, path):
    from transformers import AutoConfig, LlamaForCausalLM

    from distload.fsdp import fully_shard_blocks

    out = {}
    for policy in ("scatter", "slice"):
        with distload.empty_init():
            model = LlamaForCausalLM(AutoConfig.from_pretrained(path))
        fully_shard_blocks(model, "cpu")  # what `--mode fsdp` does: each decoder layer, then the root
        report = distload.load_checkpoint(model, path, bucket_mb=0.01, read_policy=policy)
        ids = torch.arange(12).reshape(2, 6) * 7 % 1000
        with torch.no_grad():
            out[policy] = (model(ids).logits, report.to_dict())
    return out


def test_tiny_llama_loaded_sharded_gives_the_same_logits_as_from_pretrained(tmp_path):
    from transformers import LlamaForCausalLM

    path = write_llama(tmp_path / "llama", hidden=48)
    ref = LlamaForCausalLM.from_pretrained(path)
    ids = torch.arange(12).reshape(2, 6) * 7 % 1000
    with torch.no_grad():
        want = ref(ids).logits
    full = sum(p.numel() * 4 for p in ref.parameters())
    for res in run_world(_llama_logits, 2, str(path)):
        for policy, (logits, report) in res.items():
            torch.testing.assert_close(logits, want, rtol=0, atol=0, msg=policy)
            assert report["local_bytes"] < full * 0.75, policy


def test_cli_fsdp_mode_finds_the_llama_decoder_layers():
    from transformers import LlamaConfig, LlamaForCausalLM

    from distload.fsdp import transformer_blocks

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=50, head_dim=8)
    with distload.empty_init():
        model = LlamaForCausalLM(cfg)
    assert transformer_blocks(model) is model.model.layers


# ---- memory ------------------------------------------------------------------

BUCKET_MB = 1
SLACK_MB = 8  # allocator arenas, index tensors, the status tensor and Python objects


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1024, 2048, bias=False)  # 8 MiB in fp32
        self.b = nn.Linear(2048, 1000, bias=False)  # Shard(0) rows of 8 KiB, uneven at world 3
        self.c = nn.Linear(1000, 1536)


def _measure(rank, world, path, policy):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with distload.empty_init():
        model = Big()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.0005)

    before = _rss_anon()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    report = distload.load_checkpoint(model, path, bucket_mb=BUCKET_MB, read_policy=policy)
    stop.set()
    thread.join()
    peak[0] = max(peak[0], _rss_anon())
    return peak[0] - before, report.local_bytes


@pytest.mark.parametrize("policy", ["scatter", "slice"])
def test_rss_growth_stays_within_local_shards_plus_a_few_buckets(tmp_path, policy):
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in Big().state_dict().items()}, str(tmp_path / "big.safetensors"))
    full = sum(p.numel() * 4 for p in Big().parameters())
    for growth, local in run_world(_measure, 3, str(tmp_path / "big.safetensors"), policy):
        # Owners hold two read buckets and a send buffer, everyone a receive segment.
        bound = local + 3 * BUCKET_MB * 2**20 + SLACK_MB * 2**20
        assert growth <= bound, f"grew {growth / 2**20:.1f} MiB, local {local / 2**20:.1f} MiB"
        assert local < full / 2


# ---- failures ------------------------------------------------------------------

def _owner_read_fails(rank, world, path, policy):
    import distload.io.reader as reader

    def broken(fd, buf, offset, name):
        raise OSError(f"injected read error in {name}")

    if rank == 0:
        reader.read_exact = broken
    model = _fsdp_odd(world)
    try:
        distload.load_checkpoint(model, path, bucket_mb=0.0002, read_policy=policy)
    except distload.DistLoadError as e:
        return e.phase, sorted(e.failures), all(p.is_meta for p in model.parameters())
    return None


@pytest.mark.parametrize("policy", ["scatter", "slice"])
def test_a_failed_read_on_one_rank_fails_the_sharded_load_on_every_rank(tmp_path, policy):
    write_odd(tmp_path / "odd.safetensors")
    for phase, failed, back_on_meta in run_world(_owner_read_fails, 2, str(tmp_path / "odd.safetensors"), policy):
        assert (phase, failed, back_on_meta) == ("transfer", [0], True)


class Experts(nn.Module):
    """A fused-expert tensor: one dim-0 row (an expert) holds 2 KiB, more than the test's bucket."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(5, 32, 16))
        self.norm = nn.Parameter(torch.randn(16))


def _experts_world(rank, world, path, policy):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with distload.empty_init():
        model = Experts()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    report = distload.load_checkpoint(model, path, bucket_mb=1 / 1024, read_policy=policy)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return full, report.buffer_bytes


@pytest.mark.parametrize("policy", ("scatter", "slice"))
def test_fsdp2_rows_larger_than_a_bucket_load_bit_for_bit(tmp_path, policy):
    torch.manual_seed(3)
    path = tmp_path / "experts.safetensors"
    save_file({k: v.contiguous() for k, v in Experts().state_dict().items()}, str(path))
    want = load_file(str(path))
    for full, buffer_bytes in run_world(_experts_world, 3, str(path), policy):
        assert set(full) == set(want)
        for k, v in want.items():
            assert torch.equal(full[k], v), k
        # The bound with rows above a bucket: a few of the largest row, never the whole tensor.
        assert buffer_bytes <= 4 * 32 * 16 * 4 + 4 * 1024
