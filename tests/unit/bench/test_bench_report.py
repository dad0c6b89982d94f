"""Unit tests of the benchmark's computations and rendering (synthetic inputs, no network)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import orjson
import pytest
import typer
from rich.console import Console

from pipeline.batching.batcher import BatchStats
from pipeline.bench.cli import _config
from pipeline.bench.machine import git_commit
from pipeline.bench.plot import plot_results
from pipeline.bench.procstat import CpuSampler, parse_stat_ticks
from pipeline.bench.report import (
    BenchConfig,
    BenchRun,
    PhaseInfo,
    render_markdown,
    rich_table,
    to_json,
    write_results,
)
from pipeline.bench.stats import (
    ResultRow,
    batch_summary,
    cpu_per_1k,
    drain_result,
    latency_summary,
    match_results,
    pow2_histogram,
    rate,
    rate_result,
)
from pipeline.bench.sut import parse_logged_stats
from pipeline.bench.traffic import Arrivals

# --- percentiles, rates, CPU ---------------------------------------------------------------


def test_latency_summary_percentiles_and_max() -> None:
    summary = latency_summary(np.arange(1, 101, dtype=np.float64))
    assert summary is not None
    assert summary.count == 100
    assert summary.p50_ms == pytest.approx(50.5)
    assert summary.p90_ms == pytest.approx(90.1)
    assert summary.p99_ms == pytest.approx(99.01)
    assert summary.max_ms == 100.0


def test_latency_summary_ignores_nan_and_is_none_when_empty() -> None:
    assert latency_summary([]) is None
    assert latency_summary([float("nan")]) is None
    summary = latency_summary([float("nan"), 4.0])
    assert summary is not None and summary.count == 1 and summary.max_ms == 4.0


def test_rate_and_cpu_per_1k() -> None:
    assert rate(500, 10.0, 15.0) == 100.0
    assert rate(500, 10.0, 10.0) is None
    assert rate(0, 10.0, 15.0) is None
    assert rate(5, None, 1.0) is None
    assert cpu_per_1k(2.0, 4000) == pytest.approx(0.5)
    assert cpu_per_1k(None, 4000) is None
    assert cpu_per_1k(1.0, 0) is None


def test_pow2_histogram_matches_the_lane_batcher_buckets() -> None:
    sizes = [1, 2, 3, 4, 5, 256, 257]
    stats = BatchStats()
    for size in sizes:
        stats.record(size)
    assert pow2_histogram(sizes) == {1: 1, 2: 1, 4: 2, 8: 1, 256: 1, 512: 1}
    assert pow2_histogram(sizes) == dict(sorted(stats.size_histogram.items()))


def test_batch_summary_groups_identical_scored_at() -> None:
    scored_at = np.array([1.0, 1.0, 1.0, 2.0, 3.0, 3.0, np.nan])
    summary = batch_summary(scored_at)
    assert summary is not None
    assert summary.batches == 3
    assert summary.mean == pytest.approx(2.0)
    assert summary.max == 3
    assert summary.histogram == {1: 1, 2: 1, 4: 1}
    assert batch_summary(np.array([np.nan])) is None


# --- matching and scenario results ---------------------------------------------------------


def test_match_results_counts_missing_duplicates_and_foreign() -> None:
    rows: list[ResultRow] = [("a", 1.0, 1.5, 1.2), ("b", None, 2.0, None), ("a", 1.0, 1.6, 1.2),
                             ("zz", 1.0, 1.7, 1.2)]
    matched = match_results(["a", "b", "c"], rows)
    assert matched.count == 2
    assert matched.missing == 1
    assert matched.duplicates == 1
    assert matched.unexpected == 1
    assert matched.last_received == 2.0
    assert np.isnan(matched.sent_at[1])


def _steady(n: int, per_s: float, latency_s: float, t0: float = 1000.0) -> list[ResultRow]:
    rows: list[ResultRow] = []
    for i in range(n):
        sent = t0 + i / per_s
        rows.append((f"e{i}", sent, sent + latency_s, sent + latency_s / 2))
    return rows


def test_rate_result_discards_warmup_and_computes_every_number() -> None:
    rows = _steady(1000, 100.0, 0.005)
    # The first 2 s (200 events) were slow: they must not count in the percentiles.
    rows[:200] = [(i, s, (s or 0.0) + 0.5, sc) for i, s, _, sc in rows[:200]]
    ids = [row[0] for row in rows]
    matched = match_results(ids, rows)
    result = rate_result("a", target_rate=100.0, sent=1000, started_at=1000.0,
                         last_sent=1000.0 + 999 / 100.0, matched=matched, cpu_s=3.0,
                         warmup_s=2.0)
    assert result.scenario == "rate 100/s"
    assert result.latency is not None
    assert result.latency.count == 800
    assert result.latency.p99_ms == pytest.approx(5.0)
    assert result.latency.max_ms == pytest.approx(5.0)
    assert result.offered_rate == pytest.approx(1000 / 9.99)
    assert result.achieved_rate == pytest.approx(1000 / (9.99 + 0.005))
    assert result.cpu_per_1k == pytest.approx(3.0)
    assert result.missing == 0
    assert result.batches is not None and result.batches.batches == 1000


def test_drain_result_measures_from_ready_to_last_result() -> None:
    rows: list[ResultRow] = [(f"e{i}", 1.0, 100.0 + i * 0.001, 100.0 + (i // 100)) for i in
                             range(1000)]
    matched = match_results([r[0] for r in rows] + ["lost"], rows)
    result = drain_result("c", sent=1001, ready_at=99.5, matched=matched, cpu_s=0.25)
    assert result.achieved_rate == pytest.approx(1000 / (100.999 - 99.5))
    assert result.cpu_per_1k == pytest.approx(0.25)
    assert result.missing == 1
    assert result.latency is None
    assert result.extra["first_result_after_ready_s"] == pytest.approx(0.5)
    assert result.extra["rate_after_first_result"] == pytest.approx(999 / 0.999)
    assert result.batches is not None and result.batches.histogram == {128: 10}


# --- arrivals, /proc parsing, CPU interpolation, logs -------------------------------------


def test_constant_arrivals_are_evenly_spaced() -> None:
    arrivals = Arrivals.constant(1000.0, 2.0)
    assert len(arrivals) == 2000
    assert arrivals.due(0.0) == 1
    assert arrivals.due(0.0105) == 11
    assert arrivals.due(5.0) == 2000


def test_poisson_arrivals_have_the_requested_mean_rate() -> None:
    arrivals = Arrivals.poisson(5000.0, 4.0, seed=3)
    assert abs(len(arrivals) - 20_000) < 5 * np.sqrt(20_000)
    assert np.all(np.diff(arrivals.offsets) >= 0)
    assert arrivals.offsets[-1] < 4.0
    gaps = np.diff(arrivals.offsets)
    assert np.std(gaps) == pytest.approx(np.mean(gaps), rel=0.05)  # exponential: sd == mean


def test_parse_stat_ticks_handles_odd_command_names() -> None:
    fields = ["S", "1", "1", "1", "0", "-1", "0", "0", "0", "0", "0",
              "150", "50", "7", "3", "20", "0"]
    stat = "4242 (python (x) y) " + " ".join(fields)
    assert parse_stat_ticks(stat) == 150 + 50 + 7 + 3


def test_cpu_sampler_interpolates_between_samples() -> None:
    sampler = CpuSampler(pid=0)
    sampler.times[:] = [10.0, 11.0, 12.0]
    sampler.cpu[:] = [1.0, 1.5, 3.5]
    assert sampler.between(10.5, 11.5) == pytest.approx(1.25)
    assert sampler.between(None, 11.0) is None
    assert sampler.between(9.0, 20.0) == pytest.approx(2.5)  # clamped to the sampled range


def test_parse_logged_stats_reads_the_last_lane_stats_line() -> None:
    log = (
        "[..] Lane[fraud]: LaneStats(consumed=5, produced=4, dead_lettered=1, late=0, commits=2,"
        " commit_failures=0, dlq_reasons={'schema': 1}) in-flight=0\n"
        "[..] Lane[fraud]: stopped; LaneStats(consumed=9, produced=8, dead_lettered=1, late=3, "
        "commits=4, commit_failures=0, dlq_reasons={'schema': 1, 'inference': 0})\n"
    )
    stats = parse_logged_stats(log, "LaneStats")
    assert stats == {"consumed": 9, "produced": 8, "dead_lettered": 1, "late": 3, "commits": 4,
                     "commit_failures": 0, "dlq_reasons": {"schema": 1, "inference": 0}}
    assert parse_logged_stats(log, "BatchStats") is None
    batch = parse_logged_stats("BatchStats(batches=2, rows=9, failures=0, "
                               "size_histogram={1: 1, 8: 1})", "BatchStats")
    assert batch == {"batches": 2, "rows": 9, "failures": 0, "size_histogram": {1: 1, 8: 1}}


# --- rendering ------------------------------------------------------------------------------


def _run(tmp_path: Path) -> BenchRun:
    config = BenchConfig(impls=("a", "c"), rates=(100.0,), duration_s=10.0, drain_events=1000,
                         warmup_s=2.0, poisson=False, out=tmp_path / "out",
                         result_timeout_s=30.0, seed=1, quick=False)
    rows = _steady(1000, 100.0, 0.004)
    matched = match_results([r[0] for r in rows], rows)
    lane = rate_result("a", target_rate=100.0, sent=1000, started_at=1000.0,
                       last_sent=1009.99, matched=matched, cpu_s=2.5, warmup_s=2.0)
    drain = drain_result("c", sent=1001, ready_at=999.0, matched=match_results(
        [r[0] for r in rows] + ["x"], rows), cpu_s=None)
    run = BenchRun(config=config, machine={"cpu_count": 2, "cpu_model": "test cpu"},
                   labels={"a": "(a) lane", "c": "(c) bare (yardstick)"},
                   started_at="2030-01-01 00:00:00 UTC", results=[lane, drain])
    run.phases.append(PhaseInfo(impl="a", phase="rates", log="a.log", startup_s=1.5,
                                idle_cpu_cores=0.1, lane_stats={"consumed": 1000}))
    run.notes.append("(b) rates phase failed: StackError: boom")
    return run


def test_markdown_has_the_table_with_measured_and_missing_values(tmp_path: Path) -> None:
    text = render_markdown(_run(tmp_path))
    assert "| impl | scenario | offered ev/s | achieved ev/s | p50 ms | p90 ms | p99 ms | max ms" \
        in text
    lane_row = next(line for line in text.splitlines() if line.startswith("| a | rate 100/s"))
    cells = [c.strip() for c in lane_row.strip("|").split("|")]
    assert cells[2] == "100"  # offered
    assert cells[4] == "4.0"  # p50 ms
    assert cells[8] == "2.500"  # CPU-s per 1k
    assert cells[9] == "0"  # missing
    drain_row = next(line for line in text.splitlines() if line.startswith("| c | drain"))
    drain_cells = [c.strip() for c in drain_row.strip("|").split("|")]
    assert drain_cells[4] == "—" and drain_cells[8] == "—" and drain_cells[9] == "1"
    assert "consumed=1000" in text
    assert "## Backlog drain" in text
    assert "boom" in text
    assert "yardstick" in text


def test_json_keeps_raw_numbers_and_is_valid(tmp_path: Path) -> None:
    run = _run(tmp_path)
    data = orjson.loads(to_json(run))
    assert data["config"]["out"] == str(tmp_path / "out")
    lane = data["results"][0]
    assert lane["latency"]["p50_ms"] == pytest.approx(4.0)
    assert lane["batches"]["histogram"] == {"1": 1000}
    assert data["results"][1]["missing"] == 1
    assert data["phases"][0]["idle_cpu_cores"] == 0.1


def test_rich_table_and_files(tmp_path: Path) -> None:
    run = _run(tmp_path)
    console = Console(width=200, record=True)
    console.print(rich_table(run))
    assert "rate 100/s" in console.export_text()
    written = write_results(run)
    assert [p.name for p in written] == ["results.md", "results.json"]
    png = plot_results(run.results, run.labels, tmp_path / "out" / "latency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_secure_run_says_so_in_its_report(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert "SASL_SSL" not in render_markdown(run)
    run.config = dataclasses.replace(
        _config("a", "100", 1.0, 0, tmp_path, False, False, 2.0, 30.0, 1, secure=True),
        out=run.config.out)
    assert run.config.secure
    assert "connects over TLS (SASL_SSL) as a SCRAM-SHA-512 user" in render_markdown(run)
    console = Console(width=200, record=True)
    console.print(rich_table(run))
    assert "SASL_SSL + ACLs" in console.export_text()


def test_quick_preset_and_explicit_options() -> None:
    quick = _config("a,b,c", None, None, None, Path("x"), False, True, 2.0, 30.0, 1)
    assert quick.rates == (100.0, 1000.0)
    assert quick.duration_s == 5.0
    assert quick.drain_events == 20_000
    full = _config("c", "10,20", 3.0, 0, Path("x"), True, False, 1.0, 5.0, 2)
    assert full.impls == ("c",) and full.rates == (10.0, 20.0) and full.drain_events == 0
    assert full.poisson
    assert quick.drain_workers == full.drain_workers == 1


def test_drain_workers_only_for_inferlane_workers() -> None:
    two = _config("a", "", None, 1000, Path("x"), False, False, 2.0, 30.0, 1, 2)
    assert two.drain_workers == 2 and two.rates == ()
    with pytest.raises(typer.BadParameter, match="--impl a or r only"):
        _config("a,c", None, None, None, Path("x"), False, False, 2.0, 30.0, 1, 2)


def test_git_commit_reads_refs_without_git(tmp_path: Path) -> None:
    git = tmp_path / ".git"
    (git / "refs" / "heads").mkdir(parents=True)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    (git / "refs" / "heads" / "main").write_text("abc123\n")
    assert git_commit(tmp_path) == "abc123"
    (git / "refs" / "heads" / "main").unlink()
    (git / "packed-refs").write_text("# pack-refs\ndef456 refs/heads/main\n")
    assert git_commit(tmp_path) == "def456"
    assert git_commit(tmp_path / "nowhere") is None


def test_git_commit_in_a_worktree_checkout(tmp_path: Path) -> None:
    common = tmp_path / "main" / ".git"
    own = common / "worktrees" / "wt"
    (common / "refs" / "heads").mkdir(parents=True)
    own.mkdir(parents=True)
    (own / "HEAD").write_text("ref: refs/heads/feature\n")
    (own / "commondir").write_text("../..\n")
    (common / "refs" / "heads" / "feature").write_text("fea7\n")
    checkout = tmp_path / "wt"
    checkout.mkdir()
    (checkout / ".git").write_text(f"gitdir: {own}\n")
    assert git_commit(checkout) == "fea7"


# --- the reco lane scenario ----------------------------------------------------------------


def test_reco_run_renders_its_traffic_and_no_yardstick_line(tmp_path: Path) -> None:
    config = BenchConfig(impls=("r",), rates=(2000.0,), duration_s=10.0, drain_events=0,
                         warmup_s=2.0, poisson=False, out=tmp_path / "out",
                         result_timeout_s=30.0, seed=1, quick=False, reco_k=7,
                         reco_candidate_fraction=0.25)
    run = BenchRun(config=config, machine={"cpu_count": 2, "cpu_model": "test cpu"},
                   labels={"r": "(r) inferlane reco lane"}, started_at="2030-01-01 00:00:00 UTC")
    text = render_markdown(run)
    assert "k = 7, 25% with a list of 20-200 candidates" in text
    assert "yardstick" not in text


def test_reco_traffic_is_keyed_by_user_and_logged_by_request_id() -> None:
    from pipeline.bench.reader import _Collector
    from pipeline.bench.sut import IMPLS
    from pipeline.bench.traffic import SentLog, _records
    from pipeline.dev.recogen import RecoRequestSource

    assert IMPLS["r"].lanes == "reco" and IMPLS["r"].workload.id_field == "request_id"
    source = RecoRequestSource.for_model(Path(__file__).resolve().parents[3] / "models" / "reco",
                                         seed=2)
    log = SentLog()
    records = _records(source, 5, log)
    values = [orjson.loads(value) for _, value in records]
    assert log.ids == [v["request_id"] for v in values]
    assert [key for key, _ in records] == [v["user_id"].encode() for v in values]
    assert all(log.first_at is not None and v["sent_at"] >= log.first_at for v in values)
    collector = _Collector("request_id")
    collector.expect({log.ids[0]})
    collector.add(orjson.dumps({"request_id": log.ids[0], "sent_at": 1.0, "scored_at": 2.0}), 3.0)
    collector.add(orjson.dumps({"event_id": "not-a-reco-result"}), 3.0)
    assert collector.rows == [(log.ids[0], 1.0, 3.0, 2.0)] and collector.unparsed == 1
    assert collector.complete.is_set()


def test_foreign_cpu_sampler_counts_processes_outside_the_tree() -> None:
    import subprocess
    import sys
    import time

    from pipeline.bench.procstat import ForeignCpuSampler

    # Rooted at a sleeping child, this test process itself is "foreign": burn 0.3 s of CPU.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        sampler = ForeignCpuSampler(child.pid, interval_s=0.05)
        sampler.start()
        start = time.time()
        while time.time() - start < 0.3:
            pass
        time.sleep(0.1)
        sampler.sample()
        sampler.stop()
        foreign = sampler.between(start, time.time())
    finally:
        child.kill()
        child.wait()
    assert foreign is not None and foreign >= 0.2


def test_batcher_stats_of_one_or_of_several_labelled_batchers() -> None:
    from pipeline.bench.sut import parse_batcher_stats

    one = "x: BatchStats(batches=1, rows=2, failures=0, size_histogram={2: 1})\n"
    assert parse_batcher_stats(one) == {"batches": 1, "rows": 2, "failures": 0,
                                        "size_histogram": {2: 1}}
    two = ("Lane[reco]: {'catalogue': BatchStats(batches=3, rows=9, failures=0, "
           "size_histogram={4: 3}), 'candidates': BatchStats(batches=1, rows=1, failures=0, "
           "size_histogram={1: 1})}\n")
    stats = parse_batcher_stats(one + two)
    assert stats is not None and set(stats) == {"catalogue", "candidates"}
    assert stats["catalogue"]["rows"] == 9 and stats["candidates"]["batches"] == 1
    assert parse_batcher_stats("nothing here") is None
