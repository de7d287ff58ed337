"""Three (or N) models on one GPU under intermittent peaks: elastic sharing against a static split, over a sweep
of request rates. The same as ``elastikv bench multi-model`` (every option of it works here), writing under
benchmarks/results/:

    python benchmarks/multi_model.py            # on the H100: three 8B-shaped models, the full sweep
    python benchmarks/multi_model.py --short    # two rates, one 10-minute command
    python benchmarks/multi_model.py --model /models/a --model /models/b --kv-budget 30GiB

What it measures and why the workload is long prompts with short outputs: src/elastikv/bench/multi_model.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

from elastikv.cli import run

if __name__ == "__main__":
    results = Path(__file__).resolve().parent / "results"
    sys.argv[1:] = ["bench", "multi-model", "--out", str(results), *sys.argv[1:]]
    run()  # as `elastikv` itself: an error is one line naming the problem and the fix, not a traceback
