"""Checkpoints as transformers writes them, loaded on real process worlds: equal to from_pretrained, bit for bit.

Every case loads with distload on every rank and, in the same process,
with ``from_pretrained``; the state dicts and an eval-mode forward pass must
match exactly. Replicated and FSDP2 (``fully_shard_blocks``), worlds 2 and 3.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from dist import run_world
from keyckpt import (add_position_ids, bert_config, build, dinov2_config, llama_config, mixtral_config,
                     qwen3_moe_config, save)

pytest.importorskip("transformers")

IDS = torch.tensor([[1, 5, 9, 2, 77, 3]])
STAGE_LAYERS = 2  # the pipeline stage keeps the first 2 of 4 layers


def _classes():
    from transformers import (BertModel, Dinov2Model, LlamaForCausalLM, LlamaModel, MixtralForCausalLM,
                              Qwen3MoeForCausalLM)

    return {
        "mixtral": (MixtralForCausalLM, mixtral_config),
        "qwen3_moe": (Qwen3MoeForCausalLM, qwen3_moe_config),
        "bert": (BertModel, bert_config),
        "base_into_lm": (LlamaForCausalLM, lambda: llama_config(tie=True)),
        "lm_into_base": (LlamaModel, lambda: llama_config(tie=False)),
        "stage": (LlamaForCausalLM, lambda: llama_config(tie=True, layers=4)),
        "dinov2": (Dinov2Model, dinov2_config),
    }


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, str]:
    """One checkpoint per case, each written by save_pretrained in several files."""
    from transformers import LlamaForCausalLM, LlamaModel

    root = tmp_path_factory.mktemp("keys")
    out = {}
    for name, (cls, cfg) in _classes().items():
        writer = {"base_into_lm": LlamaModel, "lm_into_base": LlamaForCausalLM}.get(name, cls)
        out[name] = str(save(build(writer, cfg()), root / name))
    add_position_ids(Path(out["bert"]), "embeddings.position_ids", bert_config().max_position_embeddings)
    return out


def _stage(model):
    """A pipeline stage: the first layers only (the rest deleted)."""
    model.model.layers = model.model.layers[:STAGE_LAYERS]
    return model


def _inputs(name: str) -> dict:
    if name == "dinov2":
        return {"pixel_values": torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))}
    return {"input_ids": IDS, **({"use_cache": False} if name not in ("bert",) else {})}


def _output(model, name: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(**_inputs(name))
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _full(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in model.state_dict().items()}


class _Bar:
    """Stands in for rank 0's progress bar: counts what the load reports."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def update(self, n: int) -> None:
        self.n += n

    def close(self) -> None:
        pass


def _one(name: str, path: str, mode: str, **kw) -> dict:
    import distload
    import distload.loader

    cls, cfg = _classes()[name]
    with distload.empty_init():
        model = cls(cfg())
    ref = cls.from_pretrained(path)
    if name == "stage":
        model, ref = _stage(model), _stage(ref)
        kw.setdefault("subset", True)
    if mode == "fsdp":
        model = distload.fsdp.fully_shard_blocks(model)
    bars: list[_Bar] = []
    real_bar = distload.loader._progress_bar
    distload.loader._progress_bar = lambda total: bars.append(_Bar(total)) or bars[-1]
    try:
        report = distload.load_checkpoint(model, path, bucket_mb=0.004, progress=True, **kw)
    finally:
        distload.loader._progress_bar = real_bar
    got, want = _full(model), ref.state_dict()
    assert got.keys() == want.keys()
    unequal = [k for k in want if not (got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]))]
    same_output = torch.equal(_output(model, name), _output(ref, name))
    return {"unequal": unequal, "same_output": same_output, "report": report.to_dict(),
            "bar": [(b.total, b.n) for b in bars]}


def _world(rank, world, ckpts, mode):
    import distload.fsdp  # noqa: F401  (fully_shard_blocks)

    torch.set_num_threads(1)
    out = {name: _one(name, ckpts[name], mode) for name in ckpts}
    if mode == "fsdp":  # each rank reads its own experts' rows itself
        out["mixtral_slice"] = _one("mixtral", ckpts["mixtral"], mode, read_policy="slice")
    if (mode, world) == ("fsdp", 3):  # last: they patch distload
        out.update(_op_cases(ckpts["dinov2"]))
    return out


class _Runs:
    """Per-rank results of one process world per (mode, world size), run when a test first asks."""

    def __init__(self, ckpts):
        self.ckpts, self.done = ckpts, {}

    def __getitem__(self, key: tuple[str, int]) -> list:
        if key not in self.done:
            mode, world = key
            self.done[key] = run_world(_world, world, self.ckpts, mode, timeout=600)
        return self.done[key]


@pytest.fixture(scope="module")
def runs(ckpts):
    return _Runs(ckpts)


CASES = ["mixtral", "qwen3_moe", "bert", "base_into_lm", "lm_into_base", "stage", "dinov2"]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", CASES)
def test_replicated_load_equals_from_pretrained(runs, name, world):
    for rank, res in enumerate(runs[("replicated", world)]):
        got = res[name]
        assert got["unequal"] == [], (rank, got["unequal"])
        assert got["same_output"], rank
        assert got["report"]["missing_keys"] == [] and got["report"]["unexpected_keys"] == []


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", CASES + ["mixtral_slice"])
def test_fsdp2_load_equals_from_pretrained(runs, name, world):
    for rank, res in enumerate(runs[("fsdp", world)]):
        got = res[name]
        assert got["unequal"] == [], (rank, got["unequal"])
        assert got["same_output"], rank


def test_slice_policy_reads_each_ranks_experts_itself(runs):
    for world in (2, 3):
        policies = runs[("fsdp", world)][0]["mixtral_slice"]["report"]["read_policy"]
        experts = {k: p for k, p in policies.items() if ".experts." in k}
        assert experts and set(experts.values()) == {"slice"}


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_per_expert_keys_are_read_once_across_the_job(runs, ckpts, mode):
    from distload.format.header import read_checkpoint

    total = sum(t.nbytes for f in read_checkpoint(ckpts["mixtral"]).files for t in f.tensors)
    for world in (2, 3):
        reports = [res["mixtral"]["report"] for res in runs[(mode, world)]]
        assert sum(r["bytes_read"] for r in reports) == total
        assert reports[0]["converted_keys"] == []  # every expert went straight into its slice


def test_ignored_keys_are_listed_and_never_read(runs, ckpts):
    from distload.format.header import read_checkpoint

    for world in (2, 3):
        for name, ignored in (("bert", "embeddings.position_ids"), ("lm_into_base", "lm_head.weight")):
            sizes = {t.name: t.nbytes for f in read_checkpoint(ckpts[name]).files for t in f.tensors}
            reports = [res[name]["report"] for res in runs[("replicated", world)]]
            assert all(r["ignored_keys"] == [ignored] for r in reports)
            assert sum(r["bytes_read"] for r in reports) == sum(sizes.values()) - sizes[ignored]


def test_pipeline_stage_reads_only_the_bytes_it_holds(runs, ckpts):
    from distload.format.header import read_checkpoint

    sizes = {t.name: t.nbytes for f in read_checkpoint(ckpts["stage"]).files for t in f.tensors}
    held = {k for k in sizes if not k.startswith("model.layers.") or int(k.split(".")[2]) < STAGE_LAYERS}
    for world in (2, 3):
        reports = [res["stage"]["report"] for res in runs[("replicated", world)]]
        assert sum(r["bytes_read"] for r in reports) == sum(sizes[k] for k in held)
        assert set(reports[0]["ignored_keys"]) == set(sizes) - held


def test_conversion_keys_are_reported(runs):
    report = runs[("replicated", 2)][0]["dinov2"]["report"]
    assert sorted(report["converted_keys"]) == [f"encoder.layer.{i}.mlp.weights_in.{w}"
                                                for i in (0, 1) for w in ("bias", "weight")]


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_rank_0s_progress_bar_counts_every_byte_the_load_moves(runs, mode):
    """Gathered ops' sources (dinov2) move after the main transfer; the bar counts them too and ends full."""
    for world in (2, 3):
        for name, res in runs[(mode, world)][0].items():
            if name in CASES:
                assert res["bar"] == [(res["report"]["total_bytes"],) * 2], (name, world)
        assert all(res["bar"] == [] for r in runs[(mode, world)][1:] for n, res in r.items() if n in CASES)


@pytest.mark.parametrize("mode", ["replicated", "fsdp"])
def test_gathered_sources_reach_only_the_op_rank(runs, ckpts, mode):
    from distload.format.header import read_checkpoint

    sizes = {t.name: t.nbytes for f in read_checkpoint(ckpts["dinov2"]).files for t in f.tensors}
    layers = {f"encoder.layer.{i}.mlp.gate_proj.{w}": [f"encoder.layer.{i}.mlp.weights_in.{w}"]
              for i in (0, 1) for w in ("bias", "weight")}  # one Chunk op per source, by first target
    for world in (2, 3):
        reports = [res["dinov2"]["report"] for res in runs[(mode, world)]]
        ran = [op for r in reports for op in r["ops_run"]]
        assert sorted(ran) == sorted(layers), ran  # each op once, on one rank
        for r in reports:  # an op's sources land on its rank alone; the others get only results
            assert r["op_source_bytes"] == sum(sizes[k] for op in r["ops_run"] for k in layers[op]), r["rank"]
        assert sum(r["bytes_read"] for r in reports) == sum(sizes.values())  # each byte read once


def _op_cases(path: str) -> dict:
    """Two loads of dinov2: FSDP2 with results sent point to point to their holders, then one whose op raises."""
    import time

    import distload
    from distload.errors import DistLoadError
    from distload.plan.keys import GatheredOp
    from transformers import Dinov2Model

    out = {"point_to_point": _one("dinov2", path, "fsdp")}

    def boom(self, tensors, model):
        raise RuntimeError("injected op failure")

    GatheredOp.run = boom  # only an op rank ever runs an op
    with distload.empty_init():
        model = Dinov2Model(dinov2_config())
    t0 = time.monotonic()
    try:
        distload.load_checkpoint(model, path, bucket_mb=0.004, timeout_s=60)
        out["failed"] = None
    except DistLoadError as e:
        out["failed"] = (str(e), sorted(e.failures), time.monotonic() - t0,
                         all(p.is_meta for p in model.parameters()))
    return out


@pytest.fixture
def op_runs(runs) -> list[dict]:
    return runs[("fsdp", 3)]


def test_fsdp2_results_reach_their_holders_point_to_point(op_runs):
    for rank, res in enumerate(op_runs):
        got = res["point_to_point"]
        assert got["unequal"] == [] and got["same_output"], rank
        assert sum(len(r["report"]["ops_run"]) for r in (x["point_to_point"] for x in op_runs)) == 4


def test_a_failing_op_fails_every_rank_naming_the_op_and_leaves_models_on_meta(op_runs):
    results = [res["failed"] for res in op_runs]
    assert all(res is not None for res in results), "every rank must raise"
    assert len({res[0] for res in results}) == 1, "every rank raises the same error"
    text, failed, _, _ = results[0]
    assert "injected op failure" in text and "Chunk(dim=0)" in text and "encoder.layer.0.mlp.weights_in" in text
    ran = {r for r, res in enumerate(op_runs) if res["point_to_point"]["report"]["ops_run"]}
    assert "convert failed on rank" in text and failed and set(failed) <= ran  # op ranks (of the first batch)
    for _, _, seconds, all_meta in results:
        assert seconds < 30 and all_meta


def _missing_world(rank, world, path):
    import distload
    from transformers import LlamaForCausalLM

    with distload.empty_init():
        model = LlamaForCausalLM(llama_config(tie=True, layers=4))  # one layer more than the checkpoint
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = distload.load_checkpoint(model, path, strict=False)
    said = [str(w.message) for w in caught if "distload" in str(w.message)]
    layer3 = model.model.layers[3].mlp.up_proj.weight
    return report.to_dict(), said, bool(torch.count_nonzero(layer3) == 0)


def test_strict_false_names_missing_keys_in_the_report_and_a_warning(ckpts):
    for rank, (report, said, zero) in enumerate(run_world(_missing_world, 2, ckpts["base_into_lm"], timeout=600)):
        assert report["missing_keys"] and all(k.startswith("model.layers.3.") for k in report["missing_keys"])
        assert "model.layers.3.mlp.up_proj.weight" in report["missing_keys"]
        assert not any("model.layers.3" in w for w in report["warnings"])  # listed once, in missing_keys
        assert zero
        assert (len(said) == 1 and "model.layers.3.mlp.up_proj.weight" in said[0]) if rank == 0 else said == []


def _strict_stage_world(rank, world, path):
    import distload
    from transformers import LlamaForCausalLM

    with distload.empty_init():
        model = _stage(LlamaForCausalLM(llama_config(tie=True, layers=4)))
    distload.load_checkpoint(model, path)


def test_a_stage_without_subset_fails_with_a_hint(ckpts):
    results = run_world(_strict_stage_world, 2, ckpts["stage"], expect_errors=True, timeout=600)
    for res in results:
        assert res[0] == "error" and "unexpected keys" in res[1] and "subset=True" in res[1]
