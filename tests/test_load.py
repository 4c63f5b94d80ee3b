"""Real multi-process loads over gloo, compared bit for bit with safetensors' own read.

Every ``_child_*`` function runs on each rank of a ``run_world`` job; the
parent compares what came back. Worlds of 1, 2, 3 and 4 cover more ranks than
files (the 3-file synthetic checkpoint, the single-file checkpoint).
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import distload
from ckpt import write_bert, write_sized
from dist import run_world
from distload.format.header import read_checkpoint
from distload.loader import load_state_dict_with_report
from distload.plan.load_plan import build_plan
from distload.plan.items import RankInfo

TINY_MB = 1024 / (1 << 20)  # 1 KiB buckets: hundreds of chunks, every tensor split or coalesced
HEAVY = 300  # seconds for worlds that import transformers on every rank of a 2-core machine


# ---- helpers (parent side) ----------------------------------------------------------


def ref_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors' own single-process read of every file the checkpoint names."""
    path = Path(path)
    if path.is_file():
        return load_file(path)
    idx = path / "model.safetensors.index.json"
    if idx.is_file():
        files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(path / f))
    return out


def raw(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str = "") -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ: {set(got) ^ set(want)}"
    for k in want:
        g, w = got[k], want[k]
        assert g.dtype == w.dtype, f"{what} {k}: dtype {g.dtype} != {w.dtype}"
        assert tuple(g.shape) == tuple(w.shape), f"{what} {k}: shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert raw(g) == raw(w), f"{what} {k}: bytes differ"


def expected_plan(path, world: int, bucket_mb: float, wanted=None):
    """The plan rank 0 makes for this world (all test ranks share this host)."""
    host = socket.gethostname()
    return build_plan(read_checkpoint(path), [RankInfo(r, host, r) for r in range(world)],
                      bucket_mb=bucket_mb, wanted=wanted)


def check_reports(reports: list[dict], plan, world: int) -> None:
    """Every rank's report agrees with the plan, and rank 0's ``ranks`` holds every rank's own figures."""
    assert len(reports) == world
    for r, rep in enumerate(reports):
        assert rep["rank"] == r and rep["world_size"] == world
        assert rep["files"] == [f.name for f in plan.files_of(r)]
        assert rep["bytes_read"] == plan.bytes_of(r)
        assert rep["total_bytes"] == plan.total_bytes
        assert rep["chunks"] == sum(1 for c in plan.chunks if c.nbytes)
        assert rep["seconds"] > 0
        assert rep["gbps"] == pytest.approx(rep["total_bytes"] / rep["seconds"] / 1e9)
        assert rep["peak_rss_bytes"] > 50 << 20  # torch alone is more than that; the unit is bytes
        assert rep["peak_rss_bytes"] < 64 << 30
        assert len(rep["ranks"]) == (world if r == 0 else 0), "only rank 0 receives the other ranks' figures"
        figures = reports[0]["ranks"][r]
        # seconds/gbps/peak are this rank's own figures, sent once as numbers: they must match exactly
        assert figures == {k: rep[k] for k in figures}
        assert set(figures) >= {"rank", "host", "node", "local_rank", "files", "bytes_read", "seconds",
                                "peak_rss_bytes", "local_bytes", "chunks", "buffer_bytes"}
    assert sum(rep["bytes_read"] for rep in reports) == plan.total_bytes
    owned = [f for rep in reports for f in rep["files"]]
    assert sorted(owned) == sorted(f.name for f in plan.files)  # each file read by exactly one rank


def clone_sd(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sd.items()}


class StateModule(nn.Module):
    """A module whose state dict holds exactly ``spec``: floats as parameters, the rest as buffers.

    ``ties`` maps an extra name to an existing parameter it shares (as lm_head/embed_tokens).
    """

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]], buffer_init=None, ties=None):
        super().__init__()
        for name, (shape, dtype) in spec.items():
            mod, leaf = self._owner(name)
            if dtype.is_floating_point:
                mod.register_parameter(leaf, nn.Parameter(torch.full(shape, 7.0, dtype=dtype)))
            else:
                init = (buffer_init or {}).get(name)
                mod.register_buffer(leaf, init.clone() if init is not None else torch.zeros(shape, dtype=dtype))
        for alias, target in (ties or {}).items():
            mod, leaf = self._owner(alias)
            mod._parameters[leaf] = self.get_parameter(target)

    def _owner(self, name: str) -> tuple[nn.Module, str]:
        *path, leaf = name.split(".")
        mod: nn.Module = self
        for part in path:  # via _modules: names such as "half" clash with Module methods
            mod = mod._modules.setdefault(part, nn.Module())
        return mod, leaf


def spec_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}


# ---- children (run on every rank) ------------------------------------------------------------


def _child_state_dicts(rank, world, synth, llama, single):
    out = {}
    for tag, path, mb in (("synth", synth, distload.plan.load_plan.DEFAULT_BUCKET_MB), ("synth_tiny", synth, TINY_MB),
                          ("llama_tiny", llama, TINY_MB), ("single", single, 0.05)):
        sd, rep = load_state_dict_with_report(path, bucket_mb=mb)
        out[tag] = (clone_sd(sd), rep.to_dict())
    # the public API, plus a dtype cast of floating tensors only
    sd = distload.load_state_dict(synth, dtype=torch.bfloat16, bucket_mb=TINY_MB)
    out["synth_bf16"] = clone_sd(sd)
    return out


def _child_modules(rank, world, synth, synth_spec, llama, llama_spec):
    out = {}
    with distload.empty_init():
        m = StateModule(synth_spec)
    assert all(p.is_meta for p in m.parameters())
    rep = distload.load_checkpoint(m, synth, bucket_mb=TINY_MB)
    assert not any(p.is_meta for p in m.parameters())
    out["synth"] = (clone_sd(m.state_dict()), rep.to_dict())

    # the Llama checkpoint's layout, tied like LlamaForCausalLM (transformers itself: test_transformers_*)
    with distload.empty_init():
        lm = StateModule(llama_spec, ties={"lm_head.weight": "model.embed_tokens.weight"})
    rep = distload.load_checkpoint(lm, llama, bucket_mb=TINY_MB)  # fp32 into fp32: direct receives
    out["llama_tied"] = lm.get_parameter("lm_head.weight") is lm.get_parameter("model.embed_tokens.weight")
    sd = lm.state_dict()
    out["llama"] = (clone_sd({k: v for k, v in sd.items() if k != "lm_head.weight"}), rep.to_dict())
    out["llama_lm_head"] = sd["lm_head.weight"].clone()
    return out


def _child_bit_exact(rank, world, synth, llama, single, synth_spec, llama_spec):
    out = _child_state_dicts(rank, world, synth, llama, single)
    out["modules"] = _child_modules(rank, world, synth, synth_spec, llama, llama_spec)
    return out


def _hf_compare(ours: nn.Module, ref: nn.Module, inputs: torch.Tensor) -> dict:
    ours.eval()
    ref.eval()
    sd, rsd = ours.state_dict(), ref.state_dict()
    bad = sorted(k for k in rsd if k not in sd or sd[k].dtype != rsd[k].dtype or not torch.equal(sd[k], rsd[k]))
    bufs, rbufs = dict(ours.named_buffers()), dict(ref.named_buffers())
    bad_bufs = sorted(k for k in rbufs if k not in bufs or bufs[k].dtype != rbufs[k].dtype
                      or not torch.equal(bufs[k], rbufs[k]))
    with torch.no_grad():
        a, b = ours(inputs).logits, ref(inputs).logits
    return {
        "keys_equal": sorted(sd) == sorted(rsd),
        "bad_weights": bad,
        "bad_buffers": bad_bufs,
        "logits_equal": torch.equal(a, b),
        "logits_dtype": str(a.dtype),
        "max_diff": (a.float() - b.float()).abs().max().item(),
        "meta_left": [n for n, p in ours.named_parameters() if p.is_meta],
        "dtypes": sorted({str(p.dtype) for p in ours.parameters()}),
    }


def _child_hf(rank, world, llama, bert):
    from transformers import AutoConfig, BertForMaskedLM, LlamaForCausalLM

    out = {}
    ids = torch.randint(0, 500, (2, 19), generator=torch.Generator().manual_seed(rank))

    cfg = AutoConfig.from_pretrained(llama)
    with torch.device("cpu"):
        fresh_inv_freq = LlamaForCausalLM(cfg).model.rotary_emb.inv_freq.clone()
    with distload.empty_init():
        ours = LlamaForCausalLM(cfg)
    rep = distload.load_checkpoint(ours, llama, dtype=torch.bfloat16, bucket_mb=0.02)
    ref = LlamaForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
    out["llama"] = _hf_compare(ours, ref, ids)
    out["llama"]["tied"] = ours.lm_head.weight is ours.model.embed_tokens.weight
    out["llama"]["ref_tied"] = ref.lm_head.weight is ref.model.embed_tokens.weight
    out["llama"]["inv_freq"] = ours.model.rotary_emb.inv_freq.clone()
    out["llama"]["fresh_inv_freq"] = fresh_inv_freq
    out["llama"]["report"] = rep.to_dict()

    cfg = AutoConfig.from_pretrained(bert)
    with distload.empty_init():
        ours = BertForMaskedLM(cfg)
    rep = distload.load_checkpoint(ours, bert, bucket_mb=0.01)
    ref = BertForMaskedLM.from_pretrained(bert)
    out["bert"] = _hf_compare(ours, ref, ids)
    out["bert"]["tied"] = ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight
    out["bert"]["position_ids"] = ours.bert.embeddings.position_ids.clone()
    out["bert"]["report"] = rep.to_dict()
    return out


def _child_mismatch(rank, world, synth, spec):
    out = {}
    ref_like = dict(spec)
    # the model lacks "small.a" (unexpected in the checkpoint) and has "extra.w" and a real,
    # persistent buffer "extra.counter" that the checkpoint does not hold (missing)
    ref_like.pop("small.a")
    ref_like["extra.w"] = ((4, 2), torch.float32)
    ref_like["extra.counter"] = ((5,), torch.int64)
    counter = torch.arange(5, dtype=torch.int64) + 100

    with distload.empty_init():
        m = StateModule(ref_like, {"extra.counter": counter})
    try:
        distload.load_checkpoint(m, synth, strict=True)
        out["strict"] = None
    except distload.DistLoadError as e:
        out["strict"] = str(e)
    out["strict_left_meta"] = all(p.is_meta for p in m.parameters())

    with distload.empty_init():
        m = StateModule(ref_like, {"extra.counter": counter})
    rep = distload.load_checkpoint(m, synth, strict=False, bucket_mb=TINY_MB)
    out["lenient"] = (clone_sd(m.state_dict()), rep.to_dict())

    bad_shape = dict(spec)
    bad_shape["big.weight"] = ((257, 300), torch.float32)
    with distload.empty_init():
        m = StateModule(bad_shape)
    for strict in (True, False):
        try:
            distload.load_checkpoint(m, synth, strict=strict)
            out[f"shape_{strict}"] = None
        except distload.DistLoadError as e:
            out[f"shape_{strict}"] = str(e)

    # after all those failures the group still works: a clean load goes through
    with distload.empty_init():
        m = StateModule(spec)
    distload.load_checkpoint(m, synth)
    out["after"] = clone_sd(m.state_dict())
    return out


def _rchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _child_io(rank, world, path, bucket_mb):
    import builtins

    load_state_dict_with_report(path, bucket_mb=bucket_mb)  # warm-up: lazy imports, thread pools
    opened: list[tuple[str, str, str]] = []
    real_os_open, real_open = os.open, builtins.open

    def phase() -> str:
        """"plan" when called from rank 0's checkpoint validation, else "data"."""
        f = sys._getframe(2)
        while f is not None:
            if f.f_code.co_name in ("read_checkpoint", "read_header"):
                return "plan"
            f = f.f_back
        return "data"

    def spy_os_open(p, flags, *a, **kw):
        opened.append(("os.open", os.fspath(p), phase()))
        return real_os_open(p, flags, *a, **kw)

    def spy_open(p, *a, **kw):
        if isinstance(p, (str, bytes, os.PathLike)):
            opened.append(("open", os.fspath(p), phase()))
        return real_open(p, *a, **kw)

    before = _rchar()
    os.open, builtins.open, io.open = spy_os_open, spy_open, spy_open
    try:
        sd, rep = load_state_dict_with_report(path, bucket_mb=bucket_mb)
    finally:
        os.open, builtins.open, io.open = real_os_open, real_open, real_open
    after = _rchar()
    return {"delta": after - before, "opened": opened, "report": rep.to_dict(),
            "sum": sum(int(v.double().sum().item()) for v in sd.values() if v.numel())}


# ---- tests ------------------------------------------------------------------------------


@pytest.fixture
def single_ckpt(tmp_path: Path) -> Path:
    """One model.safetensors file, addressed by its path."""
    g = torch.Generator().manual_seed(3)
    f = tmp_path / "single" / "model.safetensors"
    f.parent.mkdir()
    save_file({"a": torch.randn(40, 33, generator=g), "b": torch.randn(9, generator=g).half(),
               "c": torch.arange(12, dtype=torch.int16)}, str(f))
    return f


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_bit_exact_state_dicts_and_modules(world, synthetic_ckpt, llama_ckpt, single_ckpt):
    """load_state_dict and load_checkpoint on every rank equal safetensors' own read, byte for byte.

    One spawn per world does both, to keep the suite's process start-ups down.
    """
    synth_ref, llama_ref, single_ref = ref_tensors(synthetic_ckpt), ref_tensors(llama_ckpt), ref_tensors(single_ckpt)
    results = run_world(_child_bit_exact, world, str(synthetic_ckpt), str(llama_ckpt), str(single_ckpt),
                        spec_of(synth_ref), spec_of(llama_ref), timeout=HEAVY)
    # ---- load_state_dict
    for r, res in enumerate(results):
        for tag, ref in (("synth", synth_ref), ("synth_tiny", synth_ref), ("llama_tiny", llama_ref),
                         ("single", single_ref)):
            assert_bit_identical(res[tag][0], ref, f"rank {r} {tag}")
        want_bf16 = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in synth_ref.items()}
        assert_bit_identical(res["synth_bf16"], want_bf16, f"rank {r} synth_bf16")
    for tag, path, mb in (("synth", synthetic_ckpt, distload.plan.load_plan.DEFAULT_BUCKET_MB),
                          ("synth_tiny", synthetic_ckpt, TINY_MB), ("llama_tiny", llama_ckpt, TINY_MB),
                          ("single", single_ckpt, 0.05)):
        check_reports([res[tag][1] for res in results], expected_plan(path, world, mb), world)
    assert results[0]["synth_tiny"][1]["chunks"] > 300  # 1 KiB buckets really did split the 300 KB tensor
    if world > 1:
        # more ranks than files: the extra ranks read nothing
        single = [res["single"][1] for res in results]
        assert single[0]["files"] == ["model.safetensors"]
        assert all(rep["files"] == [] and rep["bytes_read"] == 0 for rep in single[1:])
    if world == 4:
        assert results[3]["synth"][1]["files"] == [] and results[3]["synth"][1]["bytes_read"] == 0
    # ---- load_checkpoint into a meta-initialized module
    for r, res in enumerate(results):
        mod = res["modules"]
        assert_bit_identical(mod["synth"][0], synth_ref, f"rank {r} synth module")
        assert_bit_identical(mod["llama"][0], llama_ref, f"rank {r} llama module")
        assert mod["llama_tied"], f"rank {r}: lm_head is no longer tied to embed_tokens"
        assert raw(mod["llama_lm_head"]) == raw(llama_ref["model.embed_tokens.weight"])
        assert mod["synth"][1]["missing_keys"] == [] and mod["synth"][1]["unexpected_keys"] == []
        assert mod["llama"][1]["missing_keys"] == [] and mod["llama"][1]["unexpected_keys"] == []
    check_reports([res["modules"]["synth"][1] for res in results], expected_plan(synthetic_ckpt, world, TINY_MB), world)
    check_reports([res["modules"]["llama"][1] for res in results], expected_plan(llama_ckpt, world, TINY_MB), world)


@pytest.mark.parametrize("world", [2, 3])
def test_transformers_models_match_from_pretrained(world, llama_ckpt, tmp_path):
    bert = write_bert(tmp_path / "bert")
    results = run_world(_child_hf, world, str(llama_ckpt), str(bert), timeout=HEAVY)
    for r, res in enumerate(results):
        for name in ("llama", "bert"):
            got = res[name]
            assert got["keys_equal"], f"rank {r} {name}: state dict keys differ"
            assert got["bad_weights"] == [], f"rank {r} {name}: weights differ from from_pretrained"
            assert got["bad_buffers"] == [], f"rank {r} {name}: buffers differ from from_pretrained"
            assert got["meta_left"] == []
            assert got["logits_equal"], f"rank {r} {name}: logits differ by {got['max_diff']}"
            assert got["tied"], f"rank {r} {name}: the tied embedding came untied"
            assert got["report"]["missing_keys"] == [] and got["report"]["unexpected_keys"] == []
        # fp32 on disk, bf16 model
        assert res["llama"]["dtypes"] == ["torch.bfloat16"] and res["llama"]["logits_dtype"] == "torch.bfloat16"
        assert res["llama"]["ref_tied"]
        # non-persistent buffers are not in the checkpoint and must keep their computed values
        assert torch.equal(res["llama"]["inv_freq"], res["llama"]["fresh_inv_freq"])
        assert res["llama"]["inv_freq"].dtype == torch.float32
        assert torch.equal(res["bert"]["position_ids"], torch.arange(64).unsqueeze(0))
        assert res["bert"]["dtypes"] == ["torch.float32"]
    check_reports([res["llama"]["report"] for res in results], expected_plan(llama_ckpt, world, 0.02), world)


def test_strictness_and_shape_mismatch(synthetic_ckpt):
    ref = ref_tensors(synthetic_ckpt)
    results = run_world(_child_mismatch, 2, str(synthetic_ckpt), spec_of(ref))
    for r, res in enumerate(results):
        # strict: one error, on every rank, listing both kinds of mismatch
        msg = res["strict"]
        assert msg is not None, f"rank {r}: strict load of a mismatched model succeeded"
        assert msg == results[0]["strict"]
        assert "missing keys" in msg and "extra.w" in msg and "extra.counter" in msg
        assert "unexpected keys" in msg and "small.a" in msg
        assert res["strict_left_meta"]
        # lenient: reported, and everything that matches is loaded exactly
        sd, rep = res["lenient"]
        assert rep["missing_keys"] == ["extra.counter", "extra.w"]
        assert rep["unexpected_keys"] == ["small.a"]
        common = {k: v for k, v in ref.items() if k != "small.a"}
        assert_bit_identical({k: v for k, v in sd.items() if k in common}, common, f"rank {r} lenient")
        assert torch.equal(sd["extra.w"], torch.zeros(4, 2))  # meta parameter: zero-filled, defined
        # a real buffer the checkpoint lacks keeps the value the model gave it
        assert torch.equal(sd["extra.counter"], torch.arange(5) + 100)
        # a shape mismatch names the key and both shapes, strict or not
        for strict in (True, False):
            msg = res[f"shape_{strict}"]
            assert msg is not None and "big.weight" in msg and "[300, 257]" in msg and "[257, 300]" in msg
        assert_bit_identical(res["after"], ref, f"rank {r} after failures")


def test_single_process_without_process_group(monkeypatch, llama_ckpt, synthetic_ckpt):
    import torch.distributed as dist

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    assert not dist.is_initialized()
    sd, rep = load_state_dict_with_report(synthetic_ckpt, bucket_mb=TINY_MB)
    assert not dist.is_initialized()  # no group was created for one process
    assert_bit_identical(sd, ref_tensors(synthetic_ckpt), "single process")
    check_reports([rep.to_dict()], expected_plan(synthetic_ckpt, 1, TINY_MB), 1)
    assert rep.files == sorted(p.name for p in synthetic_ckpt.glob("*.safetensors"))
    assert rep.bytes_read == rep.total_bytes

    from transformers import AutoConfig, LlamaForCausalLM

    with distload.empty_init():
        m = LlamaForCausalLM(AutoConfig.from_pretrained(llama_ckpt))
    rep = distload.load_checkpoint(m, llama_ckpt)
    assert isinstance(rep, distload.LoadReport)
    assert rep.world_size == 1 and rep.rank == 0 and len(rep.ranks) == 1
    assert rep.bytes_read == rep.total_bytes == sum(v.numel() * 4 for v in ref_tensors(llama_ckpt).values())
    want = ref_tensors(llama_ckpt)
    got = {k: v for k, v in m.state_dict().items() if k != "lm_head.weight"}
    assert_bit_identical(got, want, "single process llama")
    assert m.lm_head.weight is m.model.embed_tokens.weight
    text = rep.summary()
    assert "GB/s" in text and "rank" in text


def test_report_warns_on_stale_total_size(tmp_path):
    ck = write_sized(tmp_path / "ck", [8, 4])
    idx = ck / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["metadata"]["total_size"] = 1  # stale, as in stripped or quantized checkpoints
    idx.write_text(json.dumps(doc))
    sd, rep = load_state_dict_with_report(ck)
    assert any("total_size=1" in w for w in rep.warnings)
    assert_bit_identical(sd, ref_tensors(ck), "stale total_size")
    del doc["metadata"]
    idx.write_text(json.dumps(doc))
    sd, rep = load_state_dict_with_report(ck)
    assert any("total_size" in w for w in rep.warnings)


# ---- each rank reads only its assigned files -----------------------------------------------

RCHAR_SLACK = 4096  # reading /proc/self/io itself (~100 bytes per read) and nothing else


@pytest.mark.skipif(not os.access("/proc/self/io", os.R_OK), reason="needs Linux /proc/self/io")
@pytest.mark.parametrize("world,sizes", [(3, [400, 300, 200, 100, 64]), (4, [256, 128, 64])])
def test_each_rank_reads_only_its_files(world, sizes, tmp_path):
    """The report's files/bytes match the plan; /proc/self/io rchar and os.open agree.

    rchar counts bytes returned by read-family syscalls (read, pread, preadv)
    in the whole process, reader thread included. gloo moves tensors with
    recv/recvfrom on sockets, which rchar does not count (checked with strace:
    an 8 MiB gloo broadcast adds ~100 bytes of rchar, the /proc/self/io read
    itself), so a receiving rank's rchar stays flat while its owner's grows
    by the bytes it read. Each file holds >= 64 KiB, far above the slack, so
    reading any extra file would show.
    """
    ck = write_sized(tmp_path / "ck", sizes)
    bucket_mb = 0.05
    plan = expected_plan(ck, world, bucket_mb)
    results = run_world(_child_io, world, str(ck), bucket_mb)
    reports = [res["report"] for res in results]
    check_reports(reports, plan, world)
    assert len({res["sum"] for res in results}) == 1  # everyone got the same data

    smallest = min(sum(t.nbytes for t in f.tensors) for f in plan.files)
    index_bytes = (ck / "model.safetensors.index.json").stat().st_size
    headers = sum(f.data_offset for f in plan.files)  # rank 0 reads length + JSON of every header
    assert smallest > RCHAR_SLACK + index_bytes + headers + 8 * len(plan.files)
    data_files = {str(ck / f.name) for f in plan.files}
    for r, res in enumerate(results):
        mine = plan.files_of(r)
        expect = plan.bytes_of(r)
        # owners re-check the 8-byte header length of each file they open
        overhead = RCHAR_SLACK + 8 * len(mine) + (index_bytes + headers if r == 0 else 0)
        assert expect <= res["delta"] <= expect + overhead, (
            f"rank {r}: rchar grew by {res['delta']}, expected {expect} (+ up to {overhead})")
        if not mine:
            assert res["delta"] <= RCHAR_SLACK + (index_bytes + headers if r == 0 else 0)
        # who opened which tensor file, and from where
        header_opens = [p for how, p, site in res["opened"] if p in data_files and site == "plan"]
        data_opens = [(how, p, site) for how, p, site in res["opened"] if p in data_files and site == "data"]
        assert sorted(p for _, p, _ in data_opens) == sorted(str(ck / f.name) for f in mine), (
            f"rank {r} opened {data_opens}, owns {[f.name for f in mine]}")
        assert all(how == "os.open" for how, _, _ in data_opens)
        if r == 0:
            assert sorted(header_opens) == sorted(data_files)
        else:
            assert header_opens == [], f"rank {r} read headers; only rank 0 plans"
    # the extra rank of world 4 over 3 files never touched a data file
    if world > len(sizes):
        assert results[-1]["report"]["files"] == [] and results[-1]["delta"] <= RCHAR_SLACK


def test_index_key_missing_from_its_file(tmp_path):
    """An index entry its file lacks: strict names file and key; lenient reports it as missing."""
    ck = write_sized(tmp_path / "ck", [8, 4])
    idx = ck / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"]["ghost.weight"] = "model-00002-of-00002.safetensors"
    idx.write_text(json.dumps(doc))
    ref = ref_tensors(ck)
    ref.pop("ghost.weight", None)
    spec = spec_of(ref)
    spec["ghost.weight"] = ((3,), torch.float32)

    with distload.empty_init():
        m = StateModule(spec)
    with pytest.raises(distload.DistLoadError) as exc:
        distload.load_checkpoint(m, ck, strict=True)
    assert "ghost.weight" in str(exc.value) and "model-00002-of-00002.safetensors" in str(exc.value)

    with distload.empty_init():
        m = StateModule(spec)
    rep = distload.load_checkpoint(m, ck, strict=False)
    assert rep.missing_keys == ["ghost.weight"] and rep.unexpected_keys == []
    assert any("ghost.weight" in w for w in rep.warnings)
    sd = m.state_dict()
    assert torch.equal(sd.pop("ghost.weight"), torch.zeros(3))
    assert_bit_identical(sd, ref, "lenient ghost")


class _TiedTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight


def _child_tied(rank, world, path):
    with distload.empty_init():
        model = _TiedTwice()
    distload.load_checkpoint(model, path, bucket_mb=0.001)
    return model.head.weight is model.embed.weight, model.embed.weight.detach().clone()


def test_tied_weights_stored_under_both_names_load_the_parameters_own_name(tmp_path):
    torch.manual_seed(0)
    own, other = torch.randn(64, 32), torch.randn(64, 32)
    save_file({"embed.weight": own, "head.weight": other}, str(tmp_path / "m.safetensors"))
    for tied, value in run_world(_child_tied, 2, str(tmp_path / "m.safetensors")):
        assert tied
        assert torch.equal(value, own), "the name the parameter was registered under wins"


def test_the_version_is_the_installed_packages():
    import importlib.metadata

    assert distload.__version__ == importlib.metadata.version("distload")
