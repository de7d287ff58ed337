"""One SGLang Engine run for test_engine.py (SGLang starts its scheduler by spawn, so this is a script with a
``__main__`` guard): greedy tokens for fixed prompts, and with elastikv the memory the device's ledger shows at
each step. Prints one JSON line prefixed RESULT."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [[1] + [(7 * i + j) % 500 + 3 for j in range(40 + 10 * i)] for i in range(6)]
SHARED = [[1] + [(j * 13) % 500 + 3 for j in range(200)] + [i + 3, i + 4] for i in range(4)]  # one 200-token prefix
GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}


def ledger_mapped() -> int:
    from elastikv.ledger import summaries

    return sum(s.mapped_bytes for s in summaries(os.environ["ELASTIKV_LEDGER_DIR"]))


def settle(expect_at_most: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        mapped = ledger_mapped()
        if mapped <= expect_at_most or time.monotonic() > deadline:
            return mapped
        time.sleep(0.05)


def main() -> None:
    import sglang

    page_size = int(sys.argv[1])
    elastic = os.environ.get("ELASTIKV") == "1"
    kwargs = {} if elastic else {"max_total_tokens": 8192}
    eng = sglang.Engine(
        model_path=sys.argv[2],
        device="cpu",
        skip_tokenizer_init=True,
        attention_backend="torch_native",
        max_running_requests=16,
        page_size=page_size,
        dtype="float32",
        log_level="warning",
        **kwargs,
    )
    out: dict[str, object] = {}
    tokens = lambda prompts: [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=GREEDY)]  # noqa: E731
    out["tokens"] = tokens(PROMPTS)
    out["shared"] = [tokens(SHARED), tokens(SHARED)]  # the second pass hits the radix cache
    if elastic:
        from elastikv.ledger import summaries

        out["weights"] = [h.weights_bytes for s in summaries(os.environ["ELASTIKV_LEDGER_DIR"]) for h in s.holdings]
    if elastic and "PAGE_BYTES" in os.environ:  # the memory part
        page = int(os.environ["PAGE_BYTES"])
        out["idle"] = settle(page + int(os.environ["PREFIX_BYTES"]) + page)
        peak = [0]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], ledger_mapped())
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        burst = [[1] + [(31 * i + 17 * j) % 500 + 3 for j in range(1500)] for i in range(12)]
        eng.generate(input_ids=burst, sampling_params={"temperature": 0, "max_new_tokens": 4, "ignore_eos": True})
        done.set()
        watcher.join()
        out["peak"] = peak[0]
        out["after"] = settle(page + int(os.environ["PREFIX_BYTES"]) + page)
        eng.release_memory_occupation(tags=["kv_cache"])
        out["released"] = settle(page)
        eng.resume_memory_occupation(tags=["kv_cache"])
        out["tokens_after_wake"] = tokens(PROMPTS)
    eng.shutdown()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
