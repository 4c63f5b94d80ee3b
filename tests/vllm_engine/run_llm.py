"""Start a vLLM engine on a checkpoint, generate greedily, print the tokens as one JSON line.

Run as a script (vLLM's workers re-import ``__main__``, hence the guard):

    python tests/vllm_engine/run_llm.py '{"model": "/ckpt", "load_format": "distload", "tp": 2}'

Keys: ``model``, ``load_format``, ``tp``, ``pp``, ``extra`` (model_loader_extra_config),
``prompts`` (lists of token ids), ``max_tokens``, ``dtype``, ``worker_cls``.
Prints ``RESULT {"tokens": [[...], ...], "seconds": s}`` on success.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    cfg = json.loads(sys.argv[1])
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if cfg.get("tp", 1) * cfg.get("pp", 1) > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1))
                                                                    for i in range(cfg.get("tp", 1) * cfg.get("pp", 1))))
    from vllm import LLM, SamplingParams

    t0 = time.perf_counter()
    kw = {"worker_cls": cfg["worker_cls"]} if cfg.get("worker_cls") else {}
    llm = LLM(model=cfg["model"], load_format=cfg.get("load_format", "auto"),
              tensor_parallel_size=cfg.get("tp", 1), pipeline_parallel_size=cfg.get("pp", 1),
              distributed_executor_backend="mp" if cfg.get("tp", 1) * cfg.get("pp", 1) > 1 else None,
              model_loader_extra_config=cfg.get("extra") or {}, skip_tokenizer_init=True,
              dtype=cfg.get("dtype", "bfloat16"), max_model_len=cfg.get("max_model_len", 128), enforce_eager=True,
              max_num_seqs=4, seed=0, **kw)
    prompts = cfg.get("prompts") or [[1, 5, 9, 2, 7], [3, 3, 8]]
    params = SamplingParams(temperature=0.0, max_tokens=cfg.get("max_tokens", 12), ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}), flush=True)


if __name__ == "__main__":
    main()
