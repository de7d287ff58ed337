"""What each engine says about itself on its /metrics, read around every replayed trace.

Two kinds of figures, kept apart because they mean different things:

- ``gauges``: elastikv's own ``elastikv_*`` gauges (the embedded engine: time its allocator spent in the driver,
  pages mapped), cumulative since the engine started, as read after the trace;
- ``counts``: what vLLM counts of its requests (every mode that runs vLLM: static, kvcached, elastic), as this
  trace's share: the counters read after it less those read before. ``preemptions`` (requests vLLM evicted to
  make KV room), ``queue_s`` (mean seconds a request waited in vLLM's queue before it was scheduled: waiting for
  KV memory or for compute), ``prefill_s`` (mean seconds of its prefill), ``requests`` (how many the means cover).
  Where TTFT goes, per mode, beside the TTFT the client measured.

An engine that does not answer (asleep, or a kind without these figures) gives nothing: missing, never zero.
"""

from __future__ import annotations

from typing import Any

# vLLM's names (0.26 to 0.32): a counter, and two histograms whose _sum and _count give a mean
PREEMPTIONS = "vllm:num_preemptions"
QUEUE = "vllm:request_queue_time_seconds"
PREFILL = "vllm:request_prefill_time_seconds"


async def read(router: Any) -> dict[str, dict[str, float]]:
    """Each model's raw figures now: ``elastikv_*`` gauges by their name less the prefix, and vLLM's totals under
    ``vllm.preemptions``, ``vllm.queue_sum``, ``vllm.queue_count``, ``vllm.prefill_sum``, ``vllm.prefill_count``."""
    import httpx

    out: dict[str, dict[str, float]] = {}
    async with httpx.AsyncClient(timeout=5.0) as client:
        for name, model in router.models.items():
            try:
                r = await client.get(f"{model.url}/metrics")
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                out[name] = parse(r.text)
    return out


def parse(text: str) -> dict[str, float]:
    """The figures this module reads, from one Prometheus exposition (every label set summed)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("elastikv_") and family.type == "gauge" and family.samples:
            out[family.name.removeprefix("elastikv_")] = family.samples[0].value
        elif family.name == PREEMPTIONS:
            out["vllm.preemptions"] = sum(s.value for s in family.samples if s.name.endswith("_total"))
        elif family.name in (QUEUE, PREFILL):
            key = "vllm.queue" if family.name == QUEUE else "vllm.prefill"
            out[f"{key}_sum"] = sum(s.value for s in family.samples if s.name.endswith("_sum"))
            out[f"{key}_count"] = sum(s.value for s in family.samples if s.name.endswith("_count"))
    return out


def gauges(after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each model's elastikv gauges (cumulative since its engine started)."""
    return {name: {k: v for k, v in f.items() if not k.startswith("vllm.")} for name, f in after.items()}


def counts(before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Each vLLM model's share of its counters over one trace (see the module's docstring); models read both
    times only, and only where vLLM's figures were there."""
    out: dict[str, dict[str, float]] = {}
    for name, a in after.items():
        b = before.get(name)
        if b is None or "vllm.queue_count" not in a or "vllm.queue_count" not in b:
            continue
        queued = a["vllm.queue_count"] - b["vllm.queue_count"]
        prefilled = a.get("vllm.prefill_count", 0.0) - b.get("vllm.prefill_count", 0.0)
        out[name] = {
            "requests": queued,
            "preemptions": a.get("vllm.preemptions", 0.0) - b.get("vllm.preemptions", 0.0),
            "queue_s": (a["vllm.queue_sum"] - b["vllm.queue_sum"]) / queued if queued > 0 else 0.0,
            "prefill_s": (a.get("vllm.prefill_sum", 0.0) - b.get("vllm.prefill_sum", 0.0)) / prefilled
            if prefilled > 0
            else 0.0,
        }
    return out
