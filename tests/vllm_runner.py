"""A real vLLM engine in its own process, driven by the tests over stdin/stdout (one JSON object per line).

    python tests/vllm_runner.py MODEL_DIR [--prefix-caching] [--gpu [--util=0.5]] [--sleep-mode] [--tp=2]
                                [--max-model-len=N]

Replies are printed on lines starting with ``RESULT `` (vLLM logs to stdout too). Commands:

``{"op": "generate", "prompts": [[ids...], ...], "max_tokens": 16, "start_at": <time.time()>, "sample_ms": 2}``
    Greedy generation. Replies the tokens, each request's prefix-cache hits, and the KV memory this process
    held before, at peak (sampled every ``sample_ms``) and after: with elastikv in this process, the bytes its memory
    file really holds (``fstat``; RSS would count the scratch page once per slot it backs).
``{"op": "settle", "timeout": 5}``
    Wait until the allocator has trimmed back to its floor (no change for 0.5 s); reply its statistics.
    With ``"until": "floor"``: wait until no more is mapped than the reserve target and the null block's page
    (or the timeout); ``seconds`` says when, ``trace`` how mapped memory fell.
``{"op": "reset_prefix_cache"}``
    vLLM's own ``LLM.reset_prefix_cache()``; replies whether it succeeded.
``{"op": "sleep", "level": 1}`` / ``{"op": "wake"}``
    vLLM's own ``LLM.sleep(level)`` / ``LLM.wake_up()`` (start with ``--sleep-mode``); replies the seconds taken.
``{"op": "quit"}``

With ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` the engine core and the worker live in this process and the memory
figures are the engine's; otherwise only the tokens are meaningful here (the ledger has the rest).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def kv_bytes() -> int:
    """Bytes the elastic KV cache of this process really holds (0 without elastikv or in another process)."""
    from elastikv.engines.vllm import worker as vllm_worker

    cache = vllm_worker.this_worker()
    if cache is None:
        return 0
    if cache.backend.name == "cuda":  # the driver's figure is device-wide: count what this space maps
        return int(cache.space.mapped_bytes) if cache.space is not None else 0
    return int(cache.backend.allocated_bytes())  # type: ignore[attr-defined]


def instance(llm: Any) -> Any:
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    return getattr(core, "_elastikv", None)


def main() -> None:
    model = sys.argv[1]
    # (With --tp=N vLLM spawns its workers: this module is imported again in each, so nothing runs at import.)
    prefix = "--prefix-caching" in sys.argv
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    if "--gpu" in sys.argv:  # what users run: bf16, torch.compile and CUDA graphs, FlashAttention
        util = next((float(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--util=")), 0.5)
        options: dict[str, Any] = dict(dtype="bfloat16", enforce_eager=False, max_model_len=4096,
                                       max_num_batched_tokens=8192, gpu_memory_utilization=util)  # fmt: skip
    else:
        options = dict(dtype="float32", enforce_eager=True, max_model_len=2048, max_num_batched_tokens=2048,
                       gpu_memory_utilization=0.2)  # fmt: skip  # the CPU start-up check only
    for a in sys.argv:
        if a.startswith("--max-model-len="):
            options["max_model_len"] = int(a.split("=", 1)[1])
    # elastikv sizes its KV cache itself (gpu_memory_utilization sizes the plain baseline's static cache)
    tp = next((int(a.split("=", 1)[1]) for a in sys.argv if a.startswith("--tp=")), 1)
    if tp > 1:  # one worker process per rank (vLLM's multiprocessing executor), as on a multi-GPU machine
        options.update(tensor_parallel_size=tp, distributed_executor_backend="mp")
    llm = LLM(model=model, skip_tokenizer_init=True, block_size=32 if "--gpu" not in sys.argv else 16,
              enable_prefix_caching=prefix, seed=0, enable_sleep_mode="--sleep-mode" in sys.argv,
              **options)  # fmt: skip
    say({"ready": True, "pid": os.getpid(), "elastic": instance(llm) is not None})
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "quit":
            break
        if op == "generate":
            say(generate(llm, cmd, SamplingParams, TokensPrompt))
        elif op == "reset_prefix_cache":
            say({"reset": bool(llm.reset_prefix_cache())})
        elif op in ("sleep", "wake"):
            t0 = time.perf_counter()
            llm.sleep(level=int(cmd.get("level", 1))) if op == "sleep" else llm.wake_up()
            say({"seconds": time.perf_counter() - t0})
        elif op == "settle":
            say(settle(llm, float(cmd.get("timeout", 5.0)), cmd.get("until")))
        else:
            say({"error": f"unknown op {op}"})
    del llm


def generate(llm: Any, cmd: dict[str, Any], SamplingParams: Any, TokensPrompt: Any) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=int(cmd.get("max_tokens", 16)), ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in cmd["prompts"]]
    if "start_at" in cmd:  # a wall-clock time shared with other engines, so that their loads really overlap
        time.sleep(max(0.0, float(cmd["start_at"]) - time.time()))
    before = {"kv": kv_bytes()}
    peak = dict(before)
    inst = instance(llm)
    peak_mapped = 0
    stop = threading.Event()
    interval = float(cmd.get("sample_ms", 2)) / 1000  # benchmarks sample rarely: the sampler costs CPU too

    def sample() -> None:
        nonlocal peak_mapped
        while not stop.is_set():
            peak["kv"] = max(peak["kv"], kv_bytes())
            if inst is not None:
                peak_mapped = max(peak_mapped, inst.allocator.stats().mapped_bytes)
            time.sleep(interval)

    first = inst.allocator.stats() if inst is not None else None
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    stats = inst.allocator.stats() if inst is not None else None
    return {
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "finish": [str(o.outputs[0].finish_reason) for o in outs],  # "length", or "abort" when vLLM ended them
        "cached": [int(o.num_cached_tokens or 0) for o in outs],
        "seconds": seconds,
        "before": before,
        "peak": peak,
        "peak_mapped": peak_mapped,
        "refusals": stats.refusals if stats else None,
        # pages this call mapped (in the background, or on the engine's thread when the reserve was short)
        "pages_mapped": stats.pages_mapped_total - first.pages_mapped_total if stats and first else 0,
        "pages_mapped_by_caller": stats.pages_mapped_by_caller - first.pages_mapped_by_caller if stats and first else 0,
        "after": {"kv": kv_bytes()},
    }


def settle(llm: Any, timeout: float, until: str | None = None) -> dict[str, Any]:
    inst = instance(llm)
    if inst is None:
        return {"error": "no elastic cache in this process"}
    t0 = time.monotonic()
    deadline = t0 + timeout
    last, since = None, time.monotonic()
    trace: list[tuple[float, int]] = []  # (seconds, mapped bytes) at each change
    while time.monotonic() < deadline:
        st = inst.allocator.stats()
        mapped = st.mapped_bytes
        if mapped != last:
            trace.append((round(time.monotonic() - t0, 3), mapped))
            last, since = mapped, time.monotonic()
        floor = st.page_bytes * (1 + -(-st.reserve_target_blocks // inst.allocator.blocks_per_page))
        if until == "floor" and mapped <= floor:
            break
        if until is None and time.monotonic() - since > 0.5:
            break
        time.sleep(0.02)
    s = inst.allocator.stats()
    return {
        "seconds": time.monotonic() - t0,
        "trace": trace,
        "mapped": s.mapped_bytes,
        "floor": s.page_bytes * (1 + -(-s.reserve_target_blocks // inst.allocator.blocks_per_page)),
        "page_bytes": s.page_bytes,
        "in_use_blocks": s.blocks_in_use,
        "cached_blocks": inst_pool(llm).free_block_queue.num_free_blocks,
        "kv": kv_bytes(),
        "name": inst.name,
    }


def inst_pool(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write("RESULT " + json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
