"""The cross-process ledger: admission, limits, dead processes, bad ledgers; then real processes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from elastikv.allocator import AllocatorStats
from elastikv.budget import LedgerBudget
from elastikv.config import Size, parse_size
from elastikv.errors import ConfigError, LedgerError, LimitExceeded, NameTaken, UnknownInstance
from elastikv.ledger import Ledger, summaries
from elastikv.procfs import process_start_time

MiB = 1024**2
REPO = Path(__file__).resolve().parents[1]


def make_ledger(tmp_path: Path, budget: str = "64MiB", free: int | None = None) -> Ledger:
    return Ledger(
        "host:test-device",
        device_label="test device",
        total_bytes=1024 * MiB,
        free_bytes=(lambda: free) if free is not None else None,
        directory=tmp_path / "ledger",
        budget=parse_size(budget),
    )


def test_admission_checks_the_instance_limit_and_the_device_budget(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    a = LedgerBudget.register(ledger, "a", engine="test", limit=40 * MiB, capacity=512 * MiB)
    b = LedgerBudget.register(ledger, "b", engine="test", limit=40 * MiB, capacity=512 * MiB)
    a.book(32 * MiB)
    with pytest.raises(LimitExceeded, match=r"a: .* exceed its limit of 40 MiB"):
        a.book(16 * MiB)
    b.book(32 * MiB)
    with pytest.raises(LimitExceeded, match="device budget of test device is full"):
        b.book(4 * MiB)  # 68 MiB > 64 MiB budget, though within b's own limit
    a.release(8 * MiB)
    b.book(4 * MiB)
    rows = {r.name: r for r in ledger.instances()}
    assert rows["a"].mapped_bytes == 24 * MiB and rows["b"].mapped_bytes == 36 * MiB
    assert a.booked == 24 * MiB and b.booked == 36 * MiB
    ledger.close()


def test_budget_respects_memory_used_outside_elastikv(tmp_path: Path) -> None:
    """A device of 1 GiB where another program took all but 20 MiB: elastikv may hold at most those 20 MiB."""
    mapped = [0]
    ledger = Ledger(
        "host:test-device",
        total_bytes=1024 * MiB,
        directory=tmp_path / "ledger",
        budget=parse_size("95%"),
        free_bytes=lambda: 20 * MiB - mapped[0],  # what the driver reports: less as elastikv maps
    )
    a = LedgerBudget.register(ledger, "a", engine="test", limit=900 * MiB, capacity=900 * MiB)
    a.book(16 * MiB)
    mapped[0] = 16 * MiB
    with pytest.raises(LimitExceeded, match="device budget"):
        a.book(8 * MiB)
    a.book(4 * MiB)
    ledger.close()


def test_concurrent_bookings_never_overshoot(tmp_path: Path) -> None:
    """Many threads with their own connections race to book: the sum never passes the budget."""
    ledgers = [make_ledger(tmp_path) for _ in range(4)]
    budgets = [LedgerBudget.register(led, f"t{i}", engine="test", limit=64 * MiB, capacity=64 * MiB)
               for i, led in enumerate(ledgers)]  # fmt: skip
    granted = [0] * 4

    def grab(i: int) -> None:
        for _ in range(40):
            try:
                budgets[i].book(MiB)
                granted[i] += MiB
            except LimitExceeded:
                pass

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(granted) == 64 * MiB
    assert sum(r.mapped_bytes for r in ledgers[0].instances()) == 64 * MiB
    for led in ledgers:
        led.close()


def _idle_stats() -> AllocatorStats:
    return AllocatorStats(0, 0, 0, 0, 0, 0, MiB, 0, 0, 0, 0, 0, 0, 0)


def test_bursts_book_leases_within_every_bound_and_give_them_back(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)  # device budget 64 MiB
    a = LedgerBudget.register(ledger, "a", engine="test", limit=40 * MiB, capacity=64 * MiB, unit=MiB,
                              max_lease_units=8)  # fmt: skip
    b = LedgerBudget.register(ledger, "b", engine="test", limit=64 * MiB, capacity=64 * MiB, unit=MiB,
                              max_lease_units=8)  # fmt: skip
    for _ in range(30):  # a burst of page-sized bookings
        a.book(MiB)
    assert a.booked == 30 * MiB and a.transactions < 12, a.transactions  # leases: far fewer than 30
    assert a.granted <= 40 * MiB, "a lease never passes the instance's limit"
    rows = {r.name: r for r in ledger.instances()}
    assert rows["a"].mapped_bytes == a.granted
    for _ in range(40):
        try:
            b.book(MiB)
        except LimitExceeded:
            break
    assert a.granted + b.granted <= 64 * MiB, "leases never pass the device budget"
    time.sleep(LedgerBudget.QUIET + 0.1)
    a.sync(_idle_stats())
    assert a.granted == a.booked == 30 * MiB, "a quiet instance hands its unused lease back"
    a.release(10 * MiB)
    assert {r.name: r.mapped_bytes for r in ledger.instances()}["a"] == 20 * MiB
    ledger.close()


def test_names_are_unique_and_checked(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    LedgerBudget.register(ledger, "model-a", engine="test", limit=MiB, capacity=MiB)
    with pytest.raises(NameTaken, match=r"'model-a' is already running on test device .*pick another name"):
        LedgerBudget.register(ledger, "model-a", engine="test", limit=MiB, capacity=MiB)
    for bad in ("", "has space", "-dash", "x" * 65, "a/b"):
        with pytest.raises(ConfigError, match="not a usable instance name"):
            LedgerBudget.register(ledger, bad, engine="test", limit=MiB, capacity=MiB)
    with pytest.raises(ConfigError, match="must be positive"):
        LedgerBudget.register(ledger, "zero", engine="test", limit=0, capacity=MiB)
    ledger.close()


def test_limits_set_clamped_reset(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    budget = LedgerBudget.register(ledger, "m", engine="test", limit=32 * MiB, capacity=256 * MiB)
    row, warning = ledger.set_limit("m", Size(fraction=0.1))  # 10% of the 1 GiB device
    assert row.limit_bytes == 1024 * MiB // 10 and not warning
    row, warning = ledger.set_limit("m", parse_size("2GiB"))
    assert row.limit_bytes == 256 * MiB and "above m's virtual capacity" in warning
    row, _ = ledger.set_limit("m", None)
    assert row.limit_bytes == 32 * MiB
    with pytest.raises(UnknownInstance, match="no running instance named 'ghost'"):
        ledger.set_limit("ghost", parse_size("1GiB"))
    with pytest.raises(ConfigError, match="more than zero"):
        ledger.set_limit("m", Size(fraction=0.0))
    assert budget.limit == 32 * MiB
    ledger.close()


def test_a_dead_process_holds_nothing_after_the_next_access(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    code = (
        "import sys, time; from elastikv.ledger import Ledger; from elastikv.budget import LedgerBudget;"
        "from elastikv.config import parse_size;"
        f"led = Ledger('host:test-device', total_bytes={1024 * MiB}, directory={str(tmp_path / 'ledger')!r},"
        " budget=parse_size('64MiB'));"
        "b = LedgerBudget.register(led, 'doomed', engine='test', limit=64*2**20, capacity=64*2**20); b.book(48*2**20);"
        "print('booked', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "booked"
    assert [r.name for r in ledger.instances()] == ["doomed"]
    mine = LedgerBudget.register(ledger, "survivor", engine="test", limit=64 * MiB, capacity=64 * MiB)
    with pytest.raises(LimitExceeded):
        mine.book(32 * MiB)
    proc.send_signal(signal.SIGKILL)
    # Not reaped yet (a zombie, as an engine is whose parent died in a container whose PID 1 never reaps):
    # it holds nothing either.
    deadline = time.monotonic() + 10
    while Path(f"/proc/{proc.pid}/stat").read_bytes().split(b") ")[1][:1] != b"Z":
        assert time.monotonic() < deadline, "the killed process did not exit"
        time.sleep(0.01)
    mine.book(32 * MiB)  # the very next access reaps the dead row and its 48 MiB
    assert [r.name for r in ledger.instances()] == ["survivor"]
    proc.wait()
    ledger.close()


def test_a_reused_pid_does_not_keep_a_dead_row(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    LedgerBudget.register(ledger, "live", engine="test", limit=MiB, capacity=MiB)
    with sqlite3.connect(ledger.path) as db:  # a row with our pid but another process's start time
        db.execute(
            "INSERT INTO instances VALUES ('old', ?, ?, 'test', 1, 1, 1, 1, 0, 0, 0, 0)",
            (os.getpid(), (process_start_time(os.getpid()) or 0) - 1),
        )
    assert [r.name for r in ledger.instances()] == ["live"]
    ledger.close()


def test_unsafe_or_broken_ledgers_are_clear_errors(tmp_path: Path) -> None:
    ledger = make_ledger(tmp_path)
    LedgerBudget.register(ledger, "x", engine="test", limit=MiB, capacity=MiB)
    ledger.close()
    path = ledger.path
    os.chmod(path, 0o644)
    with pytest.raises(LedgerError, match=rf"open to other users \(mode 644\); run: chmod 600 {path}"):
        make_ledger(tmp_path)
    os.chmod(path, 0o600)
    os.chmod(path.parent, 0o755)
    with pytest.raises(LedgerError, match="chmod 700"):
        make_ledger(tmp_path)
    os.chmod(path.parent, 0o700)
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    garbage = b"this is not a database" * 100
    path.write_bytes(garbage)
    with pytest.raises(LedgerError, match=r"unreadable .*remove it"):
        make_ledger(tmp_path)
    assert path.read_bytes() == garbage, "a broken ledger is reported, never overwritten"
    # Beside a good one: `elastikv status` says so; a router's figures leave it out and go on.
    good = Ledger("host:good", total_bytes=MiB, directory=path.parent)
    LedgerBudget.register(good, "kept", engine="test", limit=MiB, capacity=MiB)
    with pytest.raises(LedgerError, match="unreadable"):
        summaries(path.parent)
    assert [r.name for d in summaries(path.parent, skip_unreadable=True) for r in d.instances] == ["kept"]
    good.close()
    other = Ledger("GPU-other", total_bytes=MiB, directory=tmp_path / "ledger2")
    other.close()
    Path(tmp_path / "ledger2" / "GPU-other.sqlite").rename(tmp_path / "ledger2" / "host_test-device.sqlite")
    with pytest.raises(LedgerError, match="belongs to device 'GPU-other'"):
        Ledger("host:test-device", total_bytes=MiB, directory=tmp_path / "ledger2")


# ----------------------------------------------------------------------------------------- real processes
def worker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELASTIKV")}
    env.update(
        PYTHONPATH=str(REPO / "src"),
        ELASTIKV_BACKEND="host",
        ELASTIKV_LEDGER_DIR=str(tmp_path / "ledger"),
        ELASTIKV_DEVICE_BUDGET="48MiB",
        ELASTIKV_RESERVE="4MiB",
    )
    env.update(extra)
    return env


def spawn(tmp_path: Path, *args: str, **extra: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "instance_worker.py"), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=worker_env(tmp_path, **extra),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"worker {args} failed to start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, json.loads(line)


def memfd_bytes(pid: int, fd: int) -> int:
    """What the kernel really holds for a worker's KV memory, read from outside the worker."""
    try:
        return os.stat(f"/proc/{pid}/fd/{fd}").st_blocks * 512
    except FileNotFoundError:
        return 0


def _open_at(directory: str, at: float, answers: Any) -> None:
    while time.time() < at:  # all at the same instant
        pass
    try:
        Ledger("host:race", total_bytes=MiB, directory=directory).close()
        answers.put("opened")
    except LedgerError as exc:
        answers.put(f"{type(exc).__name__}: {exc}")


def test_processes_opening_a_new_ledger_at_the_same_instant_all_open_it(tmp_path: Path) -> None:
    """Seen in CI: an engine died at start on LedgerBusy while another started beside it. Cause: a new ledger file
    is switched to WAL mode by whoever opens it first, which takes an exclusive lock that SQLite asks for without
    its busy handler, so a process opening it at the same moment gets "database is locked" at once (raw SQLite:
    22 of 720 such opens here). The ledger tries again, briefly; every process opens it."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    answers = fork.Queue()
    for round_ in range(8):
        directory = tmp_path / f"r{round_}"
        at = time.time() + 0.3
        procs = [fork.Process(target=_open_at, args=(str(directory), at, answers)) for _ in range(12)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    got = [answers.get(timeout=5) for _ in range(96)]
    assert got == ["opened"] * 96, [g for g in got if g != "opened"]


def test_four_processes_share_a_small_budget_and_a_killed_one_gives_its_share_back(tmp_path: Path) -> None:
    budget = 48 * MiB
    workers = [spawn(tmp_path, f"w{i}", "random", "4", str(i)) for i in range(4)]
    ledger = Ledger.open_existing(next((tmp_path / "ledger").glob("*.sqlite")))
    peak, samples, over = 0, 0, []
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak, samples
        while not stop.is_set():
            real = sum(memfd_bytes(info["pid"], info["memfd"]) for proc, info in workers if proc.poll() is None)
            if real > budget:
                over.append(real)
            peak = max(peak, real)
            samples += 1
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    time.sleep(1.5)
    victim, _ = workers[3]
    assert "w3" in [r.name for r in ledger.instances()]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rows = ledger.instances()  # one ledger access
    assert "w3" not in [r.name for r in rows], "the killed process still holds a share"
    assert sum(r.mapped_bytes for r in rows) <= budget
    results = []
    for proc, _ in workers[:3]:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    stop.set()
    sampler.join()
    assert not over, f"physical memory passed the budget: {max(over)} > {budget}"
    assert samples > 100 and peak > budget // 2, (samples, peak)
    assert all(r["done"] and r["allocs"] > 10 for r in results), results
    assert sum(r["refusals"] for r in results) > 0, "the budget never bound: the test proves nothing"
    assert ledger.instances() == [], "clean exits leave the ledger"
    ledger.close()


def cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "elastikv.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=worker_env(tmp_path),
    )


def status(tmp_path: Path) -> dict[str, dict[str, int]]:
    out = cli(tmp_path, "status", "--json")
    assert out.returncode == 0, out.stderr
    return {r["name"]: r for d in json.loads(out.stdout) for r in d["instances"]}


def ask(proc: subprocess.Popen[str], command: str) -> dict[str, object]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def wait_for(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.05)


def test_live_limit_changes_from_the_cli(tmp_path: Path) -> None:
    page = 4 * MiB
    proc, _ = spawn(tmp_path, "svc", "serve", ELASTIKV_LIMIT="40MiB", ELASTIKV_RESERVE="8MiB")
    assert ask(proc, "grow 96")["ok"]  # 3 pages in use; the reserve adds 2 more
    wait_for(lambda: status(tmp_path)["svc"]["mapped_bytes"] == 5 * page)

    out = cli(tmp_path, "limit", "svc", "8MiB")  # lower, below current use
    assert out.returncode == 0 and "svc: limit 8 MiB (was 40 MiB)" in out.stdout, out.stderr
    wait_for(lambda: status(tmp_path)["svc"]["mapped_bytes"] == 3 * page)  # the reserve goes back at once
    refused = ask(proc, "grow 32")
    assert not refused["ok"] and refused["error"] == "LimitExceeded"  # growth stops
    assert ask(proc, "free 32")["ok"]
    wait_for(lambda: status(tmp_path)["svc"]["mapped_bytes"] == 2 * page)  # then pages as they empty

    out = cli(tmp_path, "limit", "svc", "10%")  # raise (10% of the host's memory: far above the 40 MiB)
    assert out.returncode == 0, out.stderr
    grown = ask(proc, "grow 160")
    assert grown["ok"], grown  # growth at the next allocation
    out = cli(tmp_path, "limit", "svc", "--reset")
    assert out.returncode == 0 and "svc: limit 40 MiB" in out.stdout
    assert status(tmp_path)["svc"]["limit_bytes"] == 40 * MiB

    out = cli(tmp_path, "limit", "nobody", "1GiB")
    assert out.returncode == 3 and "no running instance named 'nobody'; running: svc" in out.stderr
    for bad in ("lots", "-1GiB", "0", "150%"):
        out = cli(tmp_path, "limit", "svc", bad)
        assert out.returncode == 2 and "limit:" in out.stderr, (bad, out.stderr)
    dup = subprocess.run(
        [sys.executable, str(REPO / "tests" / "instance_worker.py"), "svc", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env=worker_env(tmp_path),
        input="exit\n",
    )
    assert dup.returncode != 0 and "an instance named 'svc' is already running" in dup.stderr
    ask_exit = proc.stdin
    assert ask_exit is not None
    ask_exit.write("exit\n")
    ask_exit.flush()
    assert proc.wait(timeout=30) == 0
    assert status(tmp_path) == {}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_leave_the_ledger_clean(tmp_path: Path, sig: signal.Signals) -> None:
    proc, _ = spawn(tmp_path, "term", "serve")
    assert ask(proc, "grow 10")["ok"]
    assert "term" in status(tmp_path)
    proc.send_signal(sig)
    code = proc.wait(timeout=30)
    assert code in (128 + sig, -sig), code  # SIGINT: Python re-raises it after cleaning up
    with sqlite3.connect(next((tmp_path / "ledger").glob("*.sqlite"))) as db:  # no reaping: a raw look
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0


def test_status_and_limit_report_a_broken_ledger(tmp_path: Path) -> None:
    d = tmp_path / "ledger"
    d.mkdir(mode=0o700)
    (d / "host_x.sqlite").write_bytes(b"garbage" * 100)
    os.chmod(d / "host_x.sqlite", 0o600)
    out = cli(tmp_path, "status")
    assert out.returncode == 4 and "unreadable" in out.stderr and "Traceback" not in out.stderr
    out = cli(tmp_path, "limit", "x", "1GiB")
    assert out.returncode == 4


def test_a_busy_ledger_is_reported_as_busy_naming_the_holder_never_as_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 20, item 2: another process holds the write lock past the wait (here frozen with SIGSTOP inside its
    transaction). Booking fails as LedgerBusy naming that process, and says not to remove the ledger; an allocator
    over it refuses (BudgetUnavailable) instead of failing; once the holder is gone everything works again."""
    import elastikv.ledger as ledger_module
    from elastikv.errors import LedgerBusy

    monkeypatch.setattr(ledger_module, "BUSY_TIMEOUT", 0.5)
    ledger = make_ledger(tmp_path)
    budget = LedgerBudget.register(ledger, "waiting", engine="test", limit=64 * MiB, capacity=64 * MiB)
    code = (
        "import sqlite3, sys, os, signal; db = sqlite3.connect(sys.argv[1], isolation_level=None);"
        "db.execute('BEGIN IMMEDIATE'); print('locked', flush=True); os.kill(os.getpid(), signal.SIGSTOP)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(ledger.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(LedgerBusy) as caught:
            budget.book(8 * MiB)
        assert time.monotonic() - t0 < 5
        message = str(caught.value)
        assert str(holder.pid) in message and "do not remove it" in message and "rm " not in message, message
        # Readers (`elastikv status`, the router's pages) do not wait for the frozen writer: WAL snapshots.
        t0 = time.monotonic()
        assert [r.name for r in ledger.instances()] == ["waiting"]
        assert [r.name for d in summaries(ledger.directory) for r in d.instances] == ["waiting"]
        assert time.monotonic() - t0 < 0.4  # less than one busy wait
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    budget.book(8 * MiB)  # the holder is gone: its transaction rolled back, booking works again
    assert [r.mapped_bytes for r in ledger.instances()] == [8 * MiB]
    ledger.close()


def test_an_engine_the_budget_can_never_give_one_request_is_refused_at_start_saying_why(tmp_path: Path) -> None:
    """Seen on the H100 (2026-12-07): a 16 GiB budget meant for KV took one 8B engine's 15 GiB of weights, every
    engine stayed at its reserve and every request waited for ever. The room an instance could ever get is the
    budget less every engine's holdings and the others' reserves (what they map beyond that is elastic); an
    engine checks one request against it at start and refuses with the figures and the ways out."""
    from tests.conftest import SMALL

    from elastikv.config import Settings
    from elastikv.instance import open_instance
    from elastikv.memory import open_backend

    ledger = make_ledger(tmp_path)  # 64 MiB
    LedgerBudget.register(ledger, "a", engine="test", limit=40 * MiB, capacity=512 * MiB)
    LedgerBudget.register(ledger, "b", engine="test", limit=512 * MiB, capacity=512 * MiB)
    ledger.publish("b", in_use=0, reserve=6 * MiB, active=True)
    ledger.hold("b", weights=20 * MiB, other=2 * MiB)
    summary = ledger.summary()
    assert summary.kv_room("b") == 64 * MiB - 22 * MiB  # its own reserve is its KV: not subtracted
    assert summary.kv_room("a") == min(40 * MiB, 64 * MiB - 22 * MiB - 6 * MiB)  # within its own limit
    assert summary.kv_room("new") == 64 * MiB - 22 * MiB - 6 * MiB
    ledger.close()

    host = open_backend("host", host_memory=1024 * MiB)
    cfg = Settings.from_env({"ELASTIKV_LEDGER_DIR": str(tmp_path / "host-ledger"), "ELASTIKV_RESERVE": "0",
                             "ELASTIKV_DEVICE_BUDGET": "64MiB"})  # fmt: skip
    with open_instance(SMALL, engine="test", name="c", backend=host, settings=cfg, num_blocks=1024) as inst:
        inst.ledger.hold("c", weights=28 * MiB, other=0)  # what an engine books once its weights are loaded
        block = inst.allocator.page_bytes // inst.allocator.blocks_per_page
        inst.require_room(30 * MiB // block, what="one 4096-token request", fix="lower --max-model-len")  # 36 free
        with pytest.raises(ConfigError) as refused:
            inst.require_room(40 * MiB // block, what="one 4096-token request", fix="lower --max-model-len")
        assert inst.allocator.allocate(1), "a refusal changes nothing: the instance still serves"
    message = str(refused.value)
    for part in (
        "c could never hold one 4096-token request (40 MiB of KV)",
        "64 MiB, leaves it 36 MiB",
        "booked: c 28 MiB",
        "ELASTIKV_DEVICE_BUDGET",
        "lower --max-model-len",
        "ELASTIKV_BOOK_WEIGHTS=off",
    ):
        assert part in message, (part, message)  # fmt: skip
    host.close()
