"""The `elastikv` command."""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict

import click
from rich.console import Console
from rich.live import Live

from elastikv import __version__
from elastikv.config import ATTENTIONS, BACKENDS, LAYOUTS, Settings, format_bytes, parse_size
from elastikv.errors import ElastikvError, EngineDied, EngineStartFailed, Interrupted, LedgerError, UnknownInstance
from elastikv.ledger import Ledger, summaries
from elastikv.ledger_rows import ledger_files
from elastikv.ray.command import cluster
from elastikv.status_view import status_tables


def _settings(backend: str | None, layout: str | None) -> Settings:
    settings = Settings.from_env()
    changes = {k: v for k, v in {"backend": backend, "layout": layout}.items() if v is not None}
    return Settings(**{**settings.__dict__, **changes})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="elastikv")
def main() -> None:
    """Elastic, virtual-memory-backed KV caches: several LLM engines, one GPU."""


@main.command()
@click.option("--out", default="elastikv-demo", show_default=True, help="Where the PNG, the JSON and the trace go.")
@click.option("--duration", default=30.0, show_default=True, help="Seconds of trace, replayed once per mode.")
@click.option("--budget", default="12MiB", show_default=True, help="KV memory the three models share.")
@click.option("--seed", default=0, show_default=True, help="The trace comes from this seed.")
def demo(out: str, duration: float, budget: str, seed: int) -> None:
    """Three models on one device under bursty traffic: elastic sharing against a static split of the same
    memory, side by side. Prints time to first token per model and mode; writes a PNG of memory over time."""
    from elastikv.bench.demo import DemoPlan, run_demo

    size = parse_size(budget, what="--budget", allow_percent=False, allow_zero=False).resolve(0)
    run_demo(out, DemoPlan(duration=duration, seed=seed, budget=size))


@main.group()
def bench() -> None:
    """Benchmarks a user can rerun with their own models."""


@bench.command(name="multi-model")
@click.option("--model", "model_paths", multiple=True, help="A local model directory; repeat, one per model "
              "(default: one random-weight --size model, made once and served by every model).")  # fmt: skip
@click.option("--models", "count", default=3, show_default=True, help="How many models share the GPU.")
@click.option("--size", type=click.Choice(["tiny", "1b", "8b"]), default=None, help="Size of the random model "
              "(default: 8b on a GPU, tiny on a CPU).")  # fmt: skip
@click.option("--kv-budget", default=None, help="KV memory all models share, split evenly when static "
              "(default: 16GiB on a GPU, 12MiB on a CPU).")  # fmt: skip
@click.option("--rates", default=None, help="Peak request rates per model to sweep, e.g. 0.1,0.25,0.5,1.")
@click.option("--duration", type=float, default=None, help="Seconds of trace per rate.")
@click.option("--peak-width", type=float, default=None, help="Seconds each model's peak lasts.")
@click.option("--prompt-tokens", type=int, default=None, help="Prompt length of every request.")
@click.option("--output-tokens", type=int, default=None, help="Output length of every request.")
@click.option("--max-batch-tokens", type=int, default=None, help="Tokens per forward pass in each engine.")
@click.option("--attention", type=click.Choice(ATTENTIONS), default=None,
              help="The engines' attention, both modes alike (`elastikv engine --help`; default auto).")  # fmt: skip
@click.option(
    "--trace",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Replay this trace (JSON lines: at, model, prompt_tokens, output_tokens) instead of the sweep.",
)
@click.option("--engine", type=click.Choice(["embedded", "vllm"]), default="embedded", show_default=True,
              help="Serve each model with elastikv's embedded engine or with vLLM's OpenAI server.")  # fmt: skip
@click.option("--modes", default=None, help="Modes to run, e.g. static,kvcached,elastic (vllm also: elastic-v2; "
              "default static,elastic); an elastic mode with settings of its own: elastic@chunk=8MiB.")  # fmt: skip
@click.option("--workload", type=click.Choice(["long", "chat"]), default="long", show_default=True,
              help="long: every request --prompt-tokens + --output-tokens; chat: ShareGPT-like lengths.")  # fmt: skip
@click.option("--vllm-arg", "vllm_args", multiple=True, help="A flag for every vLLM server (repeat; e.g. "
              "--vllm-arg=--enforce-eager).")  # fmt: skip
@click.option("--short", is_flag=True, help="Two rates (light, peak): one 10-minute command on an H100.")
@click.option("--elastic-first", is_flag=True,
              help="Run elastic before static (repeat a run in both orders: the GPU's speed may drift).")  # fmt: skip
@click.option(
    "--merge",
    "merge",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Run nothing: merge these results (JSON of runs of one plan; other rates, or repeats) into one sweep.",
)
@click.option("--model-cache", type=click.Path(file_okay=False), default=None,
              help="Keep the random model here between runs (default: a temporary directory).")  # fmt: skip
@click.option("--out", default="elastikv-bench", show_default=True, help="Where the JSON, Markdown and PNG go.")
@click.option("--seed", default=0, show_default=True, help="Traces and weights come from this seed.")
def bench_multi_model(
    model_paths: tuple[str, ...], count: int, size: str | None, kv_budget: str | None, rates: str | None,
    duration: float | None, peak_width: float | None, prompt_tokens: int | None, output_tokens: int | None,
    max_batch_tokens: int | None, attention: str | None, trace: str | None, short: bool, elastic_first: bool,
    engine: str, modes: str | None, workload: str, vllm_args: tuple[str, ...],
    merge: tuple[str, ...], model_cache: str | None, out: str, seed: int,
) -> None:  # fmt: skip
    """N models on one GPU under intermittent peaks: static split against elastic sharing (and, with vLLM,
    kvcached), over a sweep of request rates. Prints TTFT/TPOT per rate and mode and the ratios; writes JSON,
    Markdown and a PNG."""
    from pathlib import Path

    from elastikv.bench.merge import merge_and_save
    from elastikv.bench.multi_model import run_and_save
    from elastikv.bench.plan import plan_from_options

    if merge:
        merge_and_save([Path(m) for m in merge], Path(out))
        return
    plan = plan_from_options(
        model_paths=model_paths, count=count, size=size, kv_budget=kv_budget, rates=rates, duration=duration,
        peak_width=peak_width, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        max_batch_tokens=max_batch_tokens, attention=attention, trace=trace, short=short, seed=seed,
        elastic_first=elastic_first, engine=engine, modes=modes, workload=workload, vllm_args=vllm_args,
    )  # fmt: skip
    run_and_save(plan, Path(out), model_cache=Path(model_cache) if model_cache else None)


@main.command(name="cache-demo")
@click.option("--backend", type=click.Choice(BACKENDS), default=None, help="Memory backend (default: auto).")
@click.option("--layout", type=click.Choice(LAYOUTS), default=None, help="KV layout (default: interleaved).")
@click.option("--steps", default=24, show_default=True, help="Steps of the simulated workload.")
def cache_demo(backend: str | None, layout: str | None, steps: int) -> None:
    """Grow and shrink one elastic KV cache under a burst of requests, printing what it mapped."""
    from elastikv.bench.cache_demo import run_demo

    settings = _settings(backend, layout)
    logging.basicConfig(level=settings.log_level, format="%(levelname)s %(name)s: %(message)s")
    run_demo(settings, steps=steps)


@main.command()
@click.option("--backend", type=click.Choice(BACKENDS), default=None)
def info(backend: str | None) -> None:
    """Which memory backend elastikv would use here, and the device's facts."""
    from elastikv.memory import open_backend

    settings = _settings(backend, None)
    be = open_backend(settings.backend, device=settings.device)
    free, total = be.mem_info()
    click.echo(f"backend:     {be.name}")
    click.echo(f"device:      {be.device_label}")
    click.echo(f"device id:   {be.device_id}")
    click.echo(f"granularity: {format_bytes(be.granularity)}")
    click.echo(f"memory:      {format_bytes(free)} free of {format_bytes(total)}")
    be.close()


# Exit codes a script can rely on.
EXIT_OK, EXIT_USAGE, EXIT_UNKNOWN_INSTANCE, EXIT_LEDGER, EXIT_ENGINE = 0, 2, 3, 4, 5


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
def status(as_json: bool, watch: bool) -> None:
    """Instances on each device: KV mapped, in use, reserve, limit, the weights and other memory each engine
    books beside its KV, share of the device, last activity; and the models a router has put to sleep (they
    hold nothing until their next request wakes them)."""
    ledger_dir = Settings.from_env().ledger_dir
    if as_json:
        data = [
            {
                **{k: v for k, v in asdict(d).items() if k != "instances"},
                "mapped_bytes": d.mapped_bytes,
                "held_bytes": d.held_bytes,
                "instances": [r.as_dict() for r in d.instances],
            }
            for d in summaries(ledger_dir)
        ]
        click.echo(json.dumps(data, indent=2))
        return
    console = Console()
    if not watch:
        console.print(status_tables(summaries(ledger_dir)))
        return
    with Live(status_tables(summaries(ledger_dir)), console=console, refresh_per_second=2) as live:
        try:
            while True:
                time.sleep(1.0)
                live.update(status_tables(summaries(ledger_dir)))
        except KeyboardInterrupt:
            pass


@main.command(context_settings={"ignore_unknown_options": True})  # so "-1GiB" reaches the size parser
@click.argument("name")
@click.argument("size", required=False)
@click.option("--reset", is_flag=True, help="Back to the limit the instance started with.")
@click.option("--device", default=None, help="Device id, when instances of that name run on several devices.")
def limit(name: str, size: str | None, reset: bool, device: str | None) -> None:
    """Set a running instance's memory limit: SIZE (8GiB, 512MiB) or PERCENT of the device (40%).

    \b
    Exit codes: 0 done; 2 bad arguments; 3 no running instance of that name; 4 ledger unusable.
    """
    if reset == (size is not None):
        raise click.UsageError("give either a SIZE (or PERCENT) or --reset")
    new = None if reset else parse_size(size or "", what="limit", allow_zero=False)
    ledger_dir = Settings.from_env().ledger_dir
    matches = []
    for path in ledger_files(ledger_dir):
        ledger = Ledger.open_existing(path)
        if any(r.name == name for r in ledger.instances()) and device in (None, ledger.device_id):
            matches.append(ledger)
        else:
            ledger.close()
    if not matches:
        running = sorted(r.name for d in summaries(ledger_dir) for r in d.instances)
        raise UnknownInstance(
            f"no running instance named {name!r}" + (f"; running: {', '.join(running)}" if running else "")
        )
    if len(matches) > 1:
        ids = ", ".join(m.device_id for m in matches)
        for m in matches:
            m.close()
        raise click.UsageError(f"{name!r} runs on several devices ({ids}); pick one with --device")
    ledger = matches[0]
    try:
        before = next(r for r in ledger.instances() if r.name == name).limit_bytes
        row, warning = ledger.set_limit(name, new)
    finally:
        ledger.close()
    if warning:
        click.echo(f"elastikv: warning: {warning}", err=True)
    click.echo(f"{name}: limit {format_bytes(row.limit_bytes)} (was {format_bytes(before)}) on {ledger.device_label}")


@main.command(name="engine")
@click.option("--model", "model", required=True, help="A local model directory (see `elastikv make-model`).")
@click.option(
    "--name", default=None, help="The model name clients use and `elastikv status` shows (default: the directory name)."
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option("--limit", default=None, help="KV memory limit: 8GiB, 512MiB or 40% (default: ELASTIKV_LIMIT, else all).")
@click.option("--device", default=None, help="cuda, cuda:1 or cpu (default: the GPU if there is one).")
@click.option("--dtype", default="auto", show_default=True, help="auto, bfloat16, float16 or float32.")
@click.option("--max-batch-tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="Tokens per forward pass.")  # fmt: skip
@click.option("--max-kv-tokens", default=16384, show_default=True, type=click.IntRange(min=1),
              help="KV tokens one batch may read.")  # fmt: skip
@click.option(
    "--static-kv",
    default=None,
    help="Run without elastikv: transformers' own KV cache of this size (e.g. 64MiB), held from start to end. "
    "The baseline elastikv is compared with.",
)
@click.option(
    "--attention",
    type=click.Choice(ATTENTIONS),
    default="auto",
    show_default=True,
    help="elastikv: each request attends to its own KV (flash varlen on a GPU); sdpa: transformers' paged|sdpa, "
    "one masked attention over the whole batch. auto: elastikv on a CUDA GPU in bf16/fp16, else sdpa.",
)
def engine_cmd(
    model: str,
    name: str | None,
    host: str,
    port: int,
    limit: str | None,
    device: str | None,
    dtype: str,
    max_batch_tokens: int,
    max_kv_tokens: int,
    static_kv: str | None,
    attention: str,
) -> None:
    """Serve one model with an elastic KV cache behind an OpenAI-compatible API (transformers engine).

    \b
    Exit codes: 0 stopped; 2 bad arguments or the port is taken; 5 the engine could not start (the reason is
    printed: e.g. transformers' batching thread died making its KV cache).
    """
    import dataclasses

    import uvicorn

    from elastikv import ports
    from elastikv.engines.autopatch import _setup_logging
    from elastikv.serving.engine import Engine
    from elastikv.serving.server import create_app

    settings = Settings.from_env()
    if limit is not None:
        settings = dataclasses.replace(settings, limit=parse_size(limit, what="--limit", allow_zero=False))
    _setup_logging(settings.log_level)
    # The port first: a port in use is an error before the model loads, and nothing else can take it meanwhile.
    sock = ports.listen(host, port, what="elastikv engine", fix="stop it or pass another --port")
    click.echo(f"elastikv engine: loading {model} ...", err=True)
    engine = Engine(
        model,
        name=name,
        settings=settings,
        device=device,
        dtype=dtype,
        max_batch_tokens=max_batch_tokens,
        max_kv_tokens=max_kv_tokens,
        static_kv=None
        if static_kv is None
        else parse_size(static_kv, what="--static-kv", allow_percent=False).resolve(0),
        attention=attention,
    )

    def serving() -> None:
        click.echo(
            f"elastikv engine: serving {engine.name} on http://{host}:{port}/v1 ({engine.device}, attention "
            f"{engine.attention})",
            err=True,
        )

    app = create_app(engine, close_on_shutdown=True, start_token=settings.start_token,
                     control_token=settings.control_token, on_serving=serving)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        sock.close()


@main.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.option("--host", default=None, help="Listen address (default: the config's listen, else 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Listen port (default: the config's listen, else 8000).")
@click.option("--log-dir", default=None, help="Where each engine's log goes (default: a new temporary directory).")
def serve(config: str, host: str | None, port: int | None, log_dir: str | None) -> None:
    """Serve every model in CONFIG behind one OpenAI-compatible endpoint: routing by model, idle sleep,
    wake on demand, engine supervision. Ctrl-C or SIGTERM stops every engine, at any moment.

    \b
    Exit codes: 0 stopped; 2 a bad config or a port in use; 5 an engine did not start (the end of its log is
    printed).
    """
    import asyncio

    from elastikv import ports
    from elastikv.engines.autopatch import _setup_logging
    from elastikv.router.config import load_config
    from elastikv.router.router import Router
    from elastikv.router.run import serve as run_router

    cfg = load_config(config)
    if host is not None or port is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, host=host or cfg.host, port=port or cfg.port)
    _setup_logging(Settings.from_env().log_level)
    where = f" (listen: in {config})" if host is None and port is None else ""
    sock = ports.listen(cfg.host, cfg.port, what="elastikv serve", fix=f"stop it or pass another --port{where}")
    router = Router(cfg, log_dir=log_dir)
    try:
        asyncio.run(run_router(router, sock))
    finally:
        sock.close()


@main.command(name="make-model")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--arch", default="llama", show_default=True, help="Model family.")
@click.option("--size", type=click.Choice(["tiny", "1b", "8b"]), default="tiny", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Weights come from this seed.")
def make_model_cmd(directory: str, arch: str, size: str, seed: int) -> None:
    """Write a random-weight model and a locally trained tokenizer to DIRECTORY (no model hub needed)."""
    from elastikv.bench.models import make_model

    path = make_model(directory, arch=arch, size=size, seed=seed)
    click.echo(f"wrote a random-weight {size} {arch} with its tokenizer to {path}")


@main.command(
    name="run",
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
    short_help="Run an engine command with elastikv active.",
)
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
def run_engine(command: tuple[str, ...]) -> None:
    """Run COMMAND (e.g. `vllm serve MODEL`) with ELASTIKV=1, after checking that the settings are valid and
    that vLLM will load elastikv's hook. Write `--` before the command so its options are left alone."""
    from elastikv.engines import autopatch

    autopatch.run(command)


@main.command(name="check-contract")
@click.argument("engine", type=click.Choice(["vllm", "sglang"]))
@click.argument("directory", required=False, type=click.Path(exists=True, file_okay=False))
def check_contract(engine: str, directory: str | None) -> None:
    """Check an engine's source against what elastikv's adapter for it patches or calls, without importing it:
    the installed ENGINE, or the release unpacked under DIRECTORY (a wheel's Python files; scripts/vllm-contract
    does this for any vLLM release). Prints each missing name.

    \b
    Exit codes: 0 every target present; 1 some missing; 2 bad arguments.
    """
    from pathlib import Path

    from elastikv.engines.adapters import targets_of
    from elastikv.engines.contract import check

    sys.exit(check(engine, Path(directory) if directory is not None else None, targets_of))


main.add_command(cluster)


def run() -> None:
    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except UnknownInstance as exc:
        click.echo(f"elastikv: {exc}", err=True)
        sys.exit(EXIT_UNKNOWN_INSTANCE)
    except LedgerError as exc:
        click.echo(f"elastikv: {exc}", err=True)
        sys.exit(EXIT_LEDGER)
    except Interrupted as exc:
        click.echo(f"elastikv: {exc}", err=True)
        sys.exit(130)
    except (EngineDied, EngineStartFailed) as exc:
        click.echo(f"elastikv: {exc}", err=True)
        sys.exit(EXIT_ENGINE)
    except ElastikvError as exc:
        click.echo(f"elastikv: {exc}", err=True)
        sys.exit(EXIT_USAGE)


if __name__ == "__main__":
    run()
