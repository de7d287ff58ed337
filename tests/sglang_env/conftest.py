"""Tests that run inside the SGLang test environment (``scripts/sglang-env`` builds ``.venv-sglang``).

The main suite runs this directory in that interpreter (``tests/test_sglang.py``); it is not collected by the
main environment's pytest, which has no SGLang to import. SGLang's CPU switch must be set before it is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: tiny_models
