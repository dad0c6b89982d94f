"""The soak report's per-minute bucketing: latencies by the minute an event was sent, peak RSS
by the minute it was sampled."""

from __future__ import annotations

from pipeline.bench.soak import _per_minute


def test_latencies_and_rss_land_in_the_minute_they_belong_to() -> None:
    t0 = 1_000.0
    rows = [("a", t0 + 1, t0 + 1.010, None), ("b", t0 + 59, t0 + 59.030, None),
            ("c", t0 + 61, t0 + 61.100, None), ("d", None, t0 + 62, None)]
    samples = [(t0 + 5, "worker", 100.0), (t0 + 55, "worker", 120.0), (t0 + 65, "worker", 90.0),
               (t0 + 200, "broker", 50.0)]
    first, second = _per_minute(t0, 2, rows, samples)
    assert (first.results, second.results) == (2, 1)
    assert first.max_ms is not None and round(first.max_ms) == 30
    assert second.p50_ms is not None and round(second.p50_ms) == 100
    assert first.rss_mib == {"worker": 120.0}
    assert second.rss_mib == {"worker": 90.0, "broker": 50.0}  # late samples: the last minute


def test_rss_sampler_samples_and_stops() -> None:
    import os

    from pipeline.bench import soak

    soak._SAMPLE_S, saved = 0.01, soak._SAMPLE_S
    try:
        sampler = soak._RssSampler({"me": os.getpid()})
        sampler.start()
        import time

        time.sleep(0.1)
        sampler.stop()
    finally:
        soak._SAMPLE_S = saved
    assert not sampler.is_alive()
    assert sampler.samples and all(name == "me" and rss > 0 for _, name, rss in sampler.samples)


def test_external_soak_needs_a_bootstrap() -> None:
    import os

    from typer.testing import CliRunner

    from pipeline.cli import app

    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("INFERLANE_")}
    result = CliRunner().invoke(app, ["bench", "soak", "--external", "--minutes", "1"], env=env)
    assert result.exit_code == 2
    assert "INFERLANE_KAFKA_BOOTSTRAP" in result.output
