"""The multi-model benchmark's plan: what ``elastikv bench multi-model`` runs (the models, the KV budget, the
rates, the trace's shape, the engine and its modes), its presets (a GPU's defaults, ``--short``, a CPU's), the
CLI's options made into one plan, and which modes its report compares."""

from __future__ import annotations

import dataclasses
from typing import Any

from elastikv.bench.models import SIZES
from elastikv.bench.variants import base_mode, variant_env
from elastikv.bench.vllm import VLLM_MODES
from elastikv.config import ATTENTIONS
from elastikv.errors import ConfigError

MODES = ("static", "elastic")
ENGINES = ("embedded", "vllm")
WORKLOADS = ("long", "chat")
MiB, GiB = 1024**2, 1024**3


def comparisons(modes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(mode, baseline) pairs reported as ratios: every other mode over static, and elastic modes (their variants
    too, ``variants.py``) over kvcached."""
    pairs = [(m, "static") for m in modes if m != "static"] if "static" in modes else []  # (a partial run's)
    if "kvcached" in modes:
        pairs += [(m, "kvcached") for m in modes if base_mode(m).startswith("elastic")]
    return pairs


@dataclasses.dataclass(frozen=True)
class BenchPlan:
    models: tuple[str, ...] = ("llama-a", "llama-b", "llama-c")
    size: str = "8b"  # of the random model made when model_paths is empty
    model_paths: tuple[str, ...] = ()  # the user's own models, one per name
    kv_budget: int = 16 * GiB  # KV memory all models share (elastic) or split evenly (static)
    rates: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # peak request rate per model (requests/s), one run each
    duration: float = 60.0  # seconds of trace per rate
    base_rate: float = 0.02  # requests/s per model between peaks
    peak_width: float = 20.0  # seconds, at the base of each model's peak (3 models in 60 s: no overlap)
    prompt_tokens: int = 4096
    output_tokens: int = 256  # with --attention elastikv a request lives ~13 s: 10 fit a static third at once
    max_batch_tokens: int = 2048  # tokens per forward pass (prefill chunk + decodes)
    elastic_read_tokens: int | None = None  # elastic --max-kv-tokens; default: all the budget holds
    dtype: str = "bfloat16"
    attention: str = "auto"  # the engines' --attention (serving/attention.py), the same in both modes
    reserve: int | None = None  # ELASTIKV_RESERVE for the elastic engines; None: elastikv's default
    idle_s: float | None = None  # elastic mode: sleep a model idle this long (weights to host); None: never
    trace: str | None = None  # replay this trace (JSON lines) instead of the rate sweep
    elastic_first: bool = False  # run the modes in reverse (runs in both orders cancel a drift of the GPU's speed)
    engine: str = "embedded"  # "embedded" (elastikv's own engine) or "vllm" (vLLM's OpenAI server; bench/vllm.py)
    modes: tuple[str, ...] = MODES  # vllm also: "kvcached", "elastic-v2"; static and elastic always run; variants.py
    workload: str = "long"  # "long" (prompt_tokens + output_tokens each) or "chat" (ShareGPT-like lengths)
    vllm_args: tuple[str, ...] = ()  # more flags for every vLLM server, every mode
    timeout_s: float = 600.0  # per request
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.models:
            raise ConfigError("at least one model")
        if self.model_paths and len(self.model_paths) != len(self.models):
            raise ConfigError(f"{len(self.model_paths)} --model paths for {len(self.models)} models: give one each")
        if self.size not in SIZES:
            raise ConfigError(f"--size {self.size!r}: choose one of {', '.join(SIZES)}")
        if not self.rates or any(r <= 0 for r in self.rates):
            raise ConfigError("--rates must be positive request rates, e.g. 0.25,0.5,1")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"--attention {self.attention!r}: choose one of {', '.join(ATTENTIONS)}")
        if self.prompt_tokens < 1 or self.output_tokens < 1 or self.kv_budget <= 0:
            raise ConfigError("prompt and output tokens and the KV budget must be positive")
        if self.engine not in ENGINES:
            raise ConfigError(f"--engine {self.engine!r}: choose one of {', '.join(ENGINES)}")
        known = MODES if self.engine == "embedded" else VLLM_MODES
        unknown = [m for m in self.modes if base_mode(m) not in known]
        if (
            unknown
            or "static" not in self.modes
            or "elastic" not in self.modes
            or len(set(self.modes)) < len(self.modes)
        ):
            raise ConfigError(f"--modes {','.join(self.modes)}: the {self.engine} engine runs {', '.join(known)} "
                              "(elastic ones also with settings, e.g. elastic@chunk=8MiB); static and elastic are "
                              "always among them, each once")  # fmt: skip
        for m in self.modes:
            variant_env(m)  # a variant's settings, checked now (elastic@chunk=8MiB)
        if self.workload not in WORKLOADS:
            raise ConfigError(f"--workload {self.workload!r}: choose one of {', '.join(WORKLOADS)}")


SHORT: dict[str, Any] = {  # fits one 10-minute command on the H100 (two rates: light and peak)
    "rates": (0.25, 2.0),
}
CPU: dict[str, Any] = {  # tiny models on host memory: a run in about a minute per mode, for tests and a first look
    "size": "tiny",
    "kv_budget": 12 * MiB,
    "rates": (2.0, 60.0),
    "duration": 12.0,
    "peak_width": 2.0,
    "base_rate": 0.1,
    "prompt_tokens": 256,
    "output_tokens": 16,
    "max_batch_tokens": 512,
    "dtype": "float32",
    "reserve": 0,  # a 12 MiB budget: the default reserve (256 MiB, capped) would let one idle model hold it all
}


def plan_from_options(
    *,
    model_paths: tuple[str, ...] = (),
    count: int = 3,
    size: str | None = None,
    kv_budget: str | None = None,
    rates: str | None = None,
    duration: float | None = None,
    peak_width: float | None = None,
    prompt_tokens: int | None = None,
    output_tokens: int | None = None,
    max_batch_tokens: int | None = None,
    attention: str | None = None,
    trace: str | None = None,
    short: bool = False,
    elastic_first: bool = False,
    seed: int = 0,
    engine: str = "embedded",
    modes: str | None = None,
    workload: str = "long",
    vllm_args: tuple[str, ...] = (),
) -> BenchPlan:
    """The plan for the CLI's options: the GPU defaults (three 8B models, 16 GiB of KV) where there is a GPU,
    the CPU preset (tiny models on host memory) elsewhere; ``--short`` trims the GPU sweep to one command."""
    import torch

    from elastikv.config import parse_size

    on_gpu = torch.cuda.is_available()
    fields: dict[str, Any] = {} if on_gpu else dict(CPU)
    if short and on_gpu:
        fields.update(SHORT)
    count = len(model_paths) or count
    if count < 1:
        raise ConfigError("--models must be at least 1")
    fields["models"] = tuple(f"model-{chr(ord('a') + i)}" if i < 26 else f"model-{i}" for i in range(count))
    fields["model_paths"] = tuple(model_paths)
    if size is not None:
        fields["size"] = size
    if kv_budget is not None:
        fields["kv_budget"] = parse_size(kv_budget, what="--kv-budget", allow_percent=False, allow_zero=False).resolve(
            0
        )
    if rates is not None:
        try:
            fields["rates"] = tuple(float(r) for r in rates.split(",") if r.strip())
        except ValueError:
            raise ConfigError(f"--rates {rates!r}: write request rates separated by commas, e.g. 0.25,0.5,1") from None
    given = {"duration": duration, "peak_width": peak_width, "prompt_tokens": prompt_tokens,
             "output_tokens": output_tokens, "max_batch_tokens": max_batch_tokens, "attention": attention,
             "trace": trace}  # fmt: skip
    fields.update({k: v for k, v in given.items() if v is not None})
    fields["seed"] = seed
    fields["elastic_first"] = elastic_first
    fields["engine"] = engine
    if modes is not None:
        fields["modes"] = tuple(m.strip() for m in modes.split(",") if m.strip())
    fields["workload"] = workload
    fields["vllm_args"] = tuple(vllm_args)
    return BenchPlan(**fields)
