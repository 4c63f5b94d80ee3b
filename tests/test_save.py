"""save_checkpoint: replicated, FSDP2, TP and 2-D mesh models saved by every rank in parallel,
bit for bit what was loaded, in the layout save_pretrained writes; atomic on failure; bounded memory."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import distload
from ckpt import write_llama
from dist import run_world
from distload.saver import save_checkpoint

HERE = Path(__file__).parent
BUCKET_MB = 0.01  # 10 KiB: many chunks, row blocks and coalesced buckets even in tiny models


def read_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint, checking the index names each file's tensors exactly."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(str(path / name), "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == name, k
                out[k] = f.get_tensor(k)
    assert out.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in out.values())
    return out


def wchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar")


def _llama(path: str):
    from transformers import AutoConfig, LlamaForCausalLM

    with distload.empty_init():
        return LlamaForCausalLM(AutoConfig.from_pretrained(path))


def _tp_llama(path: str, mesh):
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _llama(path)
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def _save(model, out: Path, **kw) -> tuple[dict, int]:
    before = wchar()
    report = save_checkpoint(model, out, max_shard_size="100KB", bucket_mb=BUCKET_MB, **kw)
    return report.to_dict(), wchar() - before


def _roundtrip_world(rank, world, ckpt, out):
    """Load the tiny Llama replicated, FSDP2-sharded and tensor-parallel; save each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = Path(out)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    model = _llama(ckpt)
    distload.load_checkpoint(model, ckpt)
    results["replicated"] = _save(model, out / "replicated")

    model = _llama(ckpt)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    distload.load_checkpoint(model, ckpt, bucket_mb=BUCKET_MB)
    results["fsdp"] = _save(model, out / "fsdp")

    model = _tp_llama(ckpt, mesh)
    distload.load_checkpoint(model, ckpt, bucket_mb=BUCKET_MB)
    results["tp"] = _save(model, out / "tp")
    return results


def _mesh2d_world(rank, world, ckpt, out):
    """FSDP x TP on a 2x2 mesh, loaded by distload and saved. Norms and embeddings are sharded over "dp"
    only, so ranks in different tp columns hold them on different 1-D submeshes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from transformers import AutoConfig, LlamaForCausalLM

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with distload.empty_init():
        model = LlamaForCausalLM(AutoConfig.from_pretrained(ckpt))
    plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    for layer in model.model.layers:
        parallelize_module(layer, mesh["tp"], plan)
        fully_shard(layer, mesh=mesh["dp"])  # FSDP x TP: _StridedShard on the colwise weights
    fully_shard(model, mesh=mesh["dp"])
    distload.load_checkpoint(model, ckpt, bucket_mb=BUCKET_MB)
    places = {k: str(v.placements) for k, v in model.state_dict().items() if hasattr(v, "placements")}
    return _save(model, Path(out) / "mesh2d"), places


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The source checkpoint (tied embeddings, uneven shards at world 3) and what save_pretrained writes for
    the same model built from its config, as a training job builds it."""
    from transformers import AutoConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    ckpt = write_llama(root / "ckpt")
    ref = LlamaForCausalLM(AutoConfig.from_pretrained(ckpt))
    ref.load_state_dict(LlamaForCausalLM.from_pretrained(ckpt).state_dict())
    ref.save_pretrained(root / "ref", max_shard_size="100KB")
    return ckpt, read_dir(root / "ref"), ref.state_dict()


class _Worlds(dict):
    """{world: (output root, per-rank results)}, each world run once, when a test first asks for it."""

    def __init__(self, ckpt: Path, factory):
        super().__init__()
        self.ckpt, self.factory = ckpt, factory

    def __missing__(self, world: int):
        root = self.factory.mktemp(f"saved{world}")
        self[world] = (root, run_world(_roundtrip_world, world, str(self.ckpt), str(root), timeout=600))
        return self[world]


@pytest.fixture(scope="module")
def saved(llama, tmp_path_factory):
    return _Worlds(llama[0], tmp_path_factory)


def _equal_from_pretrained(path: Path, ref_sd: dict[str, torch.Tensor]) -> None:
    from transformers import LlamaForCausalLM

    got = LlamaForCausalLM.from_pretrained(path).state_dict()
    assert got.keys() == ref_sd.keys()
    for k, v in ref_sd.items():
        assert torch.equal(got[k], v), k


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("mode", ["replicated", "fsdp", "tp"])
def test_saved_checkpoint_equals_the_loaded_one_bit_for_bit(llama, saved, world, mode):
    _, ref_files, ref_sd = llama
    root, _ = saved[world]
    files = read_dir(root / mode)
    assert files.keys() == ref_files.keys()  # save_pretrained's keys: lm_head.weight tied, not stored
    for k, v in ref_files.items():
        assert torch.equal(files[k], v), k
    _equal_from_pretrained(root / mode, ref_sd)


def test_tied_embedding_is_stored_once_under_the_name_save_pretrained_keeps(llama, saved):
    root, _ = saved[2]
    weight_map = json.loads((root / "fsdp" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in weight_map and "lm_head.weight" not in weight_map


def test_files_are_sharded_and_named_as_save_pretrained_names_them(llama, saved):
    root, _ = saved[3]
    ref = json.loads((llama[0].parent / "ref" / "model.safetensors.index.json").read_text())["weight_map"]
    got = json.loads((root / "replicated" / "model.safetensors.index.json").read_text())["weight_map"]
    assert got == ref
    assert (root / "replicated" / "config.json").is_file() and (root / "replicated" / "generation_config.json").is_file()


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_writes_its_share_measured_by_wchar(saved, world):
    root, results = saved[world]
    for mode in ("replicated", "fsdp"):
        reports = [res[mode][0] for res in results]
        total = reports[0]["total_bytes"]
        files = [f for r in reports for f in r["files"]]
        assert sorted(files) == sorted(p.name for p in (root / mode).glob("*.safetensors"))  # each file once
        largest = max(p.stat().st_size for p in (root / mode).glob("*.safetensors"))
        for rank, res in enumerate(results):
            report, wrote = res[mode]
            # /proc/self/io counts every write; the writer's bytes are its files (rank 0 adds index and configs).
            assert report["bytes_written"] == sum((root / mode / f).stat().st_size for f in report["files"])
            assert wrote >= report["bytes_written"]
            if mode == "replicated":  # no shard traffic: the files, plus the plan and reports on gloo's sockets
                assert wrote <= report["bytes_written"] + (64 << 10)
            # Largest-first onto the least-loaded rank: within one file of an equal share.
            assert abs(report["bytes_written"] - total / world) <= largest, (rank, report["bytes_written"], total)


def test_fsdp_ranks_send_only_their_shards_to_other_writers(saved):
    _, results = saved[2]
    reports = [res["fsdp"][0] for res in results]
    sent = sum(r["bytes_sent"] for r in reports)
    assert sent == sum(r["bytes_received"] for r in reports)
    assert 0 < sent < reports[0]["total_bytes"]  # about half at world 2: each writer holds half of its files
    assert all(r["bytes_sent"] == 0 for r in (res["replicated"][0] for res in results))


def test_2x2_mesh_fsdp_by_tp_saves_bit_for_bit(llama, tmp_path):
    ckpt, ref_files, ref_sd = llama
    out = run_world(_mesh2d_world, 4, str(ckpt), str(tmp_path), timeout=600)
    assert "_StridedShard" in out[0][1]["model.layers.0.self_attn.q_proj.weight"]
    files = read_dir(tmp_path / "mesh2d")
    assert files.keys() == ref_files.keys()
    for k, v in ref_files.items():
        assert torch.equal(files[k], v), k
    _equal_from_pretrained(tmp_path / "mesh2d", ref_sd)


# ---- MoE: fused experts written per expert ---------------------------------------------------------


def _moe_models():
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    mixtral = MixtralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100, num_local_experts=3, num_experts_per_tok=2)
    qwen = Qwen3MoeConfig(hidden_size=32, intermediate_size=48, moe_intermediate_size=24, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=100, num_experts=5,
                          num_experts_per_tok=2, tie_word_embeddings=True)
    return {"mixtral": (MixtralForCausalLM, mixtral), "qwen3_moe": (Qwen3MoeForCausalLM, qwen)}


def _moe_world(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fused = {}
    for name, (cls, cfg) in _moe_models().items():
        torch.manual_seed(0)
        model = cls(cfg)  # random init, the same on every rank
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        fused[name] = {k: str(v.placements) for k, v in model.state_dict().items() if "experts" in k}
        save_checkpoint(model, Path(out) / name, max_shard_size="50KB", bucket_mb=BUCKET_MB)
    return fused


# World 3 repeats world 2 on an uneven split: opt in with -m slow (it doubles the time on 2 cores).
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_fsdp2_moe_models_save_experts_per_expert_as_save_pretrained_does(tmp_path, world):
    fused = run_world(_moe_world, world, str(tmp_path), timeout=600)[0]
    for name, (cls, cfg) in _moe_models().items():
        assert any(k.endswith("gate_up_proj") for k in fused[name])  # the model holds fused experts
        torch.manual_seed(0)
        cls(cfg).save_pretrained(tmp_path / f"{name}-ref", max_shard_size="50KB")
        ref = read_dir(tmp_path / f"{name}-ref")
        got = read_dir(tmp_path / name)
        assert got.keys() == ref.keys(), sorted(got.keys() ^ ref.keys())
        assert any(".experts.0." in k for k in got)
        for k, v in ref.items():
            assert torch.equal(got[k], v), (name, k)


# ---- faults -------------------------------------------------------------------------------------------


def _enospc_world(rank, world, ckpt, out, fault_rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import distload.io.writer

    model = _llama(ckpt)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    distload.load_checkpoint(model, ckpt, bucket_mb=BUCKET_MB)
    save_checkpoint(model, out, max_shard_size="100KB", bucket_mb=BUCKET_MB)  # the previous checkpoint
    if rank == fault_rank:
        calls = [0]
        real = distload.io.writer._pwrite

        def full(fd, data, offset):
            calls[0] += 1
            if calls[0] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data, offset)

        distload.io.writer._pwrite = full
    try:
        save_checkpoint(model, out, max_shard_size="100KB", bucket_mb=BUCKET_MB, dtype=torch.bfloat16)
    except distload.DistLoadError as e:
        return e.phase, sorted(e.failures), str(e)
    return None


# World 3 repeats world 2 on an uneven split: opt in with -m slow (it doubles the time on 2 cores).
@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_write_error_on_one_rank_fails_every_rank_and_keeps_the_old_checkpoint(llama, tmp_path, world):
    ckpt, ref_files, _ = llama
    out = tmp_path / "ckpt"
    results = run_world(_enospc_world, world, str(ckpt), str(out), 1, timeout=600)
    for res in results:
        assert res is not None, "the save succeeded"
        phase, failures, text = res
        assert failures == [1], text
        assert "No space left on device" in text
    assert len({r[2] for r in results}) == 1  # the same message everywhere
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staging directory, no temporary file
    files = read_dir(out)  # the previous (fp32) checkpoint, whole
    assert all(v.dtype == torch.float32 for v in files.values())
    for k, v in ref_files.items():
        assert torch.equal(files[k], v), k


def test_a_failed_first_save_leaves_nothing(llama, tmp_path):
    model = nn.Linear(4, 4)

    def broken(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    import distload.io.writer

    real, distload.io.writer._pwrite = distload.io.writer._pwrite, broken
    try:
        with pytest.raises(distload.DistLoadError, match="No space left"):
            save_checkpoint(model, tmp_path / "out")
    finally:
        distload.io.writer._pwrite = real
    assert os.listdir(tmp_path) == []


def test_a_rank_killed_mid_save_under_torchrun_leaves_no_index(llama, tmp_path):
    ckpt = llama[0]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                               "MASTER_PORT")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--monitor-interval", "2",
           "--nproc_per_node", "2", str(HERE / "save_kill_worker.py"), str(ckpt), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "rank 1 kills itself now" in text, text[-3000:]
    assert not out.exists()
    assert not list(tmp_path.rglob("*.index.json"))


# ---- memory --------------------------------------------------------------------------------------------

MEM_BUCKET_MB = 1
SLACK_MB = 8  # allocator arenas, Python objects, the plan


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(1024, 2048, bias=False)  # 8 MiB in fp32
        self.b = nn.Linear(2048, 1000, bias=False)  # uneven rows at world 3
        self.c = nn.Linear(1000, 1536)


def _measure_save(rank, world, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Big()
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    local = sum(v.to_local().numel() * 4 for v in model.state_dict().values())
    save_checkpoint(model, Path(out) / "warm", bucket_mb=MEM_BUCKET_MB, max_shard_size="10MB")  # imports, first use
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.0005)

    before = _rss_anon()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    report = save_checkpoint(model, Path(out) / "ckpt", bucket_mb=MEM_BUCKET_MB, max_shard_size="10MB")
    stop.set()
    thread.join()
    peak[0] = max(peak[0], _rss_anon())
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return peak[0] - before, local, report.bytes_written, full


def test_fsdp2_save_memory_growth_stays_within_three_buckets(tmp_path):
    """A writer holds two staging buffers and one receive buffer; a sender one pack buffer."""
    results = run_world(_measure_save, 3, str(tmp_path), timeout=600)
    full = sum(p.numel() * 4 for p in Big().parameters())
    got = read_dir(tmp_path / "ckpt")
    for k, v in results[0][3].items():
        assert torch.equal(got[k], v), k
    for growth, local, wrote, _ in results:
        bound = 3 * MEM_BUCKET_MB * 2**20 + SLACK_MB * 2**20
        assert growth <= bound, f"grew {growth / 2**20:.1f} MiB, local shards {local / 2**20:.1f} MiB"
        assert local < full / 2 and wrote > 0


# ---- the training entry point ----------------------------------------------------------------------------


def test_train_fsdp_saves_with_save_dir_and_the_result_loads_with_from_pretrained(llama, tmp_path):
    from launch_env import clean_env, venv_tool

    ckpt, ref_files, ref_sd = llama
    train = HERE.parent / "launch" / "train_fsdp.py"
    proc = subprocess.run(
        [venv_tool("torchrun"), "--standalone", "--nproc_per_node", "2", str(train), str(ckpt), "--device", "cpu",
         "--steps", "0", "--bucket-mb", "0.05", "--save", str(tmp_path / "out"), "--max-shard-size", "100KB"],
        env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "distload save:" in proc.stdout
    files = read_dir(tmp_path / "out")
    for k, v in ref_files.items():  # no steps: the saved weights are the loaded ones
        assert torch.equal(files[k], v), k
    _equal_from_pretrained(tmp_path / "out", ref_sd)


# ---- the pure plan ----------------------------------------------------------------------------------------


def test_box_of_recognizes_expert_rows_and_chunks_and_refuses_transposes():
    from distload.model.save_keys import box_of

    base = torch.empty(3, 8, 4, device="meta")
    assert box_of(base[1], (3, 8, 4)) == ((1, 2), (0, 8), (0, 4))
    assert box_of(base[2].chunk(2, dim=0)[1], (3, 8, 4)) == ((2, 3), (4, 8), (0, 4))
    assert box_of(base[:, 2:6], (3, 8, 4)) == ((0, 3), (2, 6), (0, 4))
    assert box_of(base[0].t(), (3, 8, 4)) is None


def test_split_follows_save_pretrained_and_headers_parse_as_safetensors():
    from distload.format.header import parse_header
    from distload.plan.save_plan import OutTensor, build_plan, split_files

    def t(name, n, dtype="F32"):
        return OutTensor(name, name, dtype, (n,), ((0, n),))

    tensors = [t("a", 10), t("b", 30), t("c", 5, "BF16"), t("big", 100), t("d", 1)]
    # 40 + 120 B fill the first file; 10 B would pass the limit, so a new one opens; 400 B is too large
    # and gets a file of its own at once, before the open one closes (huggingface_hub's order).
    assert split_files(tensors, 160) == [[0, 1], [3], [2, 4]]
    plan = build_plan(tensors, {}, {x.name: x.shape for x in tensors}, [], max_shard_size=160, bucket_bytes=64,
                      stage="/nowhere")
    assert [f.name for f in plan.files] == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    for spec in plan.files:
        parsed = parse_header(spec.header[8:], spec.size, spec.name)  # distload's own validator
        assert sorted(x.name for x in parsed.tensors) == sorted(tensors[i].name for i in spec.tensors)
    chunks = [c for c in plan.chunks if c.file == 1]
    assert sum(c.nbytes for c in chunks) == 400 and all(c.nbytes <= 64 for c in chunks)  # row blocks


def test_contributions_cover_each_element_once_with_replicated_dims():
    from distload.plan.save_plan import OutTensor, build_plan, contributions, own_parts
    from distload.plan.shard import Placement, Sharding

    # HSDP-like: replicate over mesh dim 0, shard rows over dim 1, world 4; the writer holds half.
    sh = Sharding((0, 1, 2, 3), (2, 2), (Placement("replicate"), Placement("shard", 0)))
    t = OutTensor("w", "w", "F32", (5, 3), ((0, 5), (0, 3)))
    plan = build_plan([t], {"w": sh}, {"w": (5, 3)}, [], max_shard_size=10**6, bucket_bytes=1 << 20,
                      stage="/nowhere")
    plan = type(plan)(**{**plan.__dict__, "world_size": 4, "writers": (2,)})
    chunk = type(plan.chunks[0])(0, 2, plan.chunks[0].offset, 60, plan.chunks[0].pieces, True)
    parts = contributions(plan, chunk)
    # Rank 2 holds rows 0-2 itself; rows 3-4 come from rank 3, the replica on the writer's side of the
    # replicate dim (rank 1 holds them too and sends nothing).
    assert sorted(parts) == [2, 3]
    assert parts[2] == [(0, ((0, 3), (0, 3)))] and parts[3] == [(0, ((3, 5), (0, 3)))]
    assert {r: own_parts(plan, chunk, r) for r in (0, 1, 3)} == {0: [], 1: [], 3: parts[3]}, \
        "each sender works out its own part alone, as the writer does"


def test_save_cli_reshards_a_checkpoint_under_torchrun(llama, tmp_path):
    from launch_env import clean_env, venv_tool

    ckpt, ref_files, ref_sd = llama
    proc = subprocess.run(
        [venv_tool("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "distload.save", str(ckpt),
         str(tmp_path / "out"), "--max-shard-size", "300KB", "--bucket-mb", "0.05"],
        env=clean_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "RuntimeWarning" not in proc.stderr
    assert len(list((tmp_path / "out").glob("*.safetensors"))) < len(list(ckpt.glob("*.safetensors")))
    files = read_dir(tmp_path / "out")
    assert files.keys() == ref_files.keys() and all(torch.equal(files[k], v) for k, v in ref_files.items())
