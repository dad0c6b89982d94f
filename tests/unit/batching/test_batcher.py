"""Unit tests for pipeline.batching.batcher.MicroBatcher (fake model functions, no onnxruntime)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from numpy.typing import NDArray

from pipeline.batching.batcher import MicroBatcher

Matrix = NDArray[np.float32]


def _double_first(m: Matrix) -> Matrix:
    return m[:, 0] * 2


def _rows(n: int, base: float, width: int = 3) -> Matrix:
    """``n`` rows whose first column is ``base, base+1, ...`` (tells the callers apart)."""
    out = np.zeros((n, width), dtype=np.float32)
    out[:, 0] = base + np.arange(n, dtype=np.float32)
    return out


class FakeModel:
    """Model function that records what it sees; while ``gate`` is closed every call blocks.

    A closed gate stands for a slow model: the test decides exactly when the batch finishes.
    """

    def __init__(self, fn: Callable[[Matrix], Matrix] = _double_first, *, blocked: bool = False):
        self.fn = fn
        self.sizes: list[int] = []
        self.inputs: list[Matrix] = []
        self.calls: list[float] = []
        self.ends: list[float] = []
        self.gate = threading.Event()
        if not blocked:
            self.gate.set()

    def __call__(self, m: Matrix) -> Matrix:
        self.calls.append(time.monotonic())
        self.sizes.append(len(m))
        self.inputs.append(m.copy())
        if not self.gate.wait(timeout=5.0):
            raise TimeoutError("test never released the gate")
        try:
            return self.fn(m)
        finally:
            self.ends.append(time.monotonic())

    async def started(self, n: int, timeout: float = 2.0) -> None:
        """Wait until the model has been called ``n`` times."""
        deadline = time.monotonic() + timeout
        while len(self.calls) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"model called {len(self.calls)} times, expected {n}")
            await asyncio.sleep(0.001)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-model")
    yield pool
    pool.shutdown(wait=True)


@pytest.fixture
def model() -> Iterator[FakeModel]:
    m = FakeModel()
    yield m
    m.gate.set()  # never leave a thread blocked if a test fails early


@pytest.fixture
def slow_model() -> Iterator[FakeModel]:
    m = FakeModel(blocked=True)
    yield m
    m.gate.set()


def _batcher(
    fn: Callable[[Matrix], Matrix], executor: ThreadPoolExecutor, *, batch_max_rows: int = 64,
    max_wait_ms: float = 5.0, max_in_flight_batches: int = 1,
) -> MicroBatcher:
    return MicroBatcher(fn, batch_max_rows=batch_max_rows, max_wait_ms=max_wait_ms,
                        executor=executor, max_in_flight_batches=max_in_flight_batches)


@pytest.fixture
async def batcher(model: FakeModel, executor: ThreadPoolExecutor) -> AsyncIterator[MicroBatcher]:
    b = _batcher(model, executor, batch_max_rows=8)
    await b.start()
    yield b
    model.gate.set()
    await asyncio.wait_for(b.stop(), 5)


# --- constructor ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_max_rows": 0}, "batch_max_rows"),
        ({"batch_max_rows": -5}, "batch_max_rows"),
        ({"max_wait_ms": -0.001}, "max_wait_ms"),
        ({"max_wait_ms": 100.001}, "max_wait_ms"),
        ({"max_wait_ms": 150}, "max_wait_ms"),
        ({"max_in_flight_batches": 0}, "max_in_flight_batches"),
        ({"max_in_flight_batches": -1}, "max_in_flight_batches"),
    ],
)
def test_constructor_rejects_bad_values(kwargs: dict[str, float], match: str) -> None:
    args: dict[str, float] = {"batch_max_rows": 4, "max_wait_ms": 5.0, "max_in_flight_batches": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MicroBatcher(_double_first, batch_max_rows=int(args["batch_max_rows"]),
                     max_wait_ms=args["max_wait_ms"],
                     max_in_flight_batches=int(args["max_in_flight_batches"]))


@pytest.mark.parametrize(("rows", "wait_ms"), [(1, 0.0), (1, 100.0), (65_536, 50.0)])
def test_constructor_accepts_bounds(rows: int, wait_ms: float) -> None:
    b = MicroBatcher(_double_first, batch_max_rows=rows, max_wait_ms=wait_ms)
    assert b.batch_max_rows == rows
    assert b.max_wait_s == pytest.approx(wait_ms / 1000.0)


# --- correctness ---------------------------------------------------------------------------------


async def test_outputs_align_with_inputs(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    async with _batcher(slow_model, executor, batch_max_rows=4) as b:
        plug = asyncio.ensure_future(b.submit(_rows(1, -1.0)))
        await slow_model.started(1)
        # While the plug batch runs, five callers queue 12 rows: batches of 4 + 4 + 4.
        sizes = [3, 3, 3, 1, 2]
        calls = [asyncio.ensure_future(b.submit(_rows(n, 100.0 * i))) for i, n in enumerate(sizes)]
        await asyncio.sleep(0.01)
        slow_model.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*calls), 2)
        np.testing.assert_array_equal(await plug, np.array([-2.0], dtype=np.float32))
    for i, (n, out) in enumerate(zip(sizes, results, strict=True)):
        assert out.shape == (n,)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, 2 * (100.0 * i + np.arange(n, dtype=np.float32)))
    assert slow_model.sizes == [1, 4, 4, 4]
    # Batch 2 = caller 0 (3 rows) + first row of caller 1, in submission order.
    np.testing.assert_array_equal(slow_model.inputs[1][:, 0], [0.0, 1.0, 2.0, 100.0])
    np.testing.assert_array_equal(slow_model.inputs[2][:, 0], [101.0, 102.0, 200.0, 201.0])
    np.testing.assert_array_equal(slow_model.inputs[3][:, 0], [202.0, 300.0, 400.0, 401.0])


async def test_many_concurrent_callers_each_get_their_own_rows(
    model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    async with _batcher(model, executor, batch_max_rows=16) as b:
        sizes = [(i * 7) % 11 + 1 for i in range(40)]
        results = await asyncio.wait_for(
            asyncio.gather(*(b.submit(_rows(n, 1000.0 * i)) for i, n in enumerate(sizes))), 3)
    for i, (n, out) in enumerate(zip(sizes, results, strict=True)):
        np.testing.assert_array_equal(out, 2 * (1000.0 * i + np.arange(n, dtype=np.float32)))
    assert max(model.sizes) <= 16
    assert sum(model.sizes) == sum(sizes)


async def test_large_matrix_is_split_and_reassembled(
    model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    async with _batcher(model, executor, batch_max_rows=4) as b:
        out = await asyncio.wait_for(b.submit(_rows(10, 0.0)), 2)
    assert model.sizes == [4, 4, 2]
    np.testing.assert_array_equal(out, 2 * np.arange(10, dtype=np.float32))
    assert out.shape == (10,)


async def test_split_matrix_with_max_in_flight_reassembles_in_order(
    executor: ThreadPoolExecutor,
) -> None:
    # Later slices may finish first: the first slice is made the slowest one.
    def fn(m: Matrix) -> Matrix:
        if m[0, 0] == 0.0:
            time.sleep(0.05)
        return m[:, 0] * 2

    model = FakeModel(fn)
    async with _batcher(model, executor, batch_max_rows=3, max_wait_ms=0,
                        max_in_flight_batches=3) as b:
        out = await asyncio.wait_for(b.submit(_rows(9, 0.0)), 2)
    assert sorted(model.sizes) == [3, 3, 3]
    np.testing.assert_array_equal(out, 2 * np.arange(9, dtype=np.float32))


async def test_batches_never_exceed_batch_max_rows(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    async with _batcher(slow_model, executor, batch_max_rows=5) as b:
        plug = asyncio.ensure_future(b.submit(_rows(1, 0.0)))
        await slow_model.started(1)
        calls = [asyncio.ensure_future(b.submit(_rows(n, 10.0 * n))) for n in (2, 7, 1, 12, 3)]
        await asyncio.sleep(0.01)
        slow_model.gate.set()
        await asyncio.wait_for(asyncio.gather(plug, *calls), 2)
    assert slow_model.sizes == [1, 5, 5, 5, 5, 5]
    assert all(size <= 5 for size in slow_model.sizes)


# --- timing: greedy, continuous, max wait --------------------------------------------------------


@pytest.mark.parametrize("in_flight", [1, 2])
async def test_lone_submit_to_idle_batcher_is_scored_at_once(
    model: FakeModel, executor: ThreadPoolExecutor, in_flight: int
) -> None:
    async with _batcher(model, executor, max_wait_ms=100,
                        max_in_flight_batches=in_flight) as b:
        await asyncio.sleep(0.005)  # the runner is idle, waiting for work
        submitted = time.monotonic()
        out = await b.submit(_rows(1, 3.0))
    np.testing.assert_array_equal(out, [6.0])
    assert len(model.calls) == 1
    # No timer wait: far below max_wait_ms (100 ms).
    assert model.calls[0] - submitted < 0.05


async def test_continuous_batching_groups_arrivals_during_a_running_batch(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    async with _batcher(slow_model, executor, batch_max_rows=64, max_wait_ms=5) as b:
        first = asyncio.ensure_future(b.submit(_rows(1, 0.0)))
        await slow_model.started(1)
        late = [asyncio.ensure_future(b.submit(_rows(1, float(i)))) for i in range(1, 11)]
        await asyncio.sleep(0.05)  # the slow batch runs 50 ms; arrivals must not start a batch
        assert slow_model.sizes == [1]
        slow_model.gate.set()
        outputs = await asyncio.wait_for(asyncio.gather(first, *late), 2)
    assert slow_model.sizes == [1, 10]
    assert slow_model.calls[1] >= slow_model.ends[0]
    assert [float(o[0]) for o in outputs] == [2.0 * i for i in range(11)]


async def test_second_batch_in_flight_starts_after_max_wait(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    async with _batcher(slow_model, executor, batch_max_rows=8, max_wait_ms=20,
                        max_in_flight_batches=2) as b:
        first = asyncio.ensure_future(b.submit(_rows(1, 0.0)))
        await slow_model.started(1)
        submitted = time.monotonic()
        second = asyncio.ensure_future(b.submit(_rows(1, 1.0)))
        await slow_model.started(2)
        waited = slow_model.calls[1] - submitted
        assert not slow_model.ends  # the first batch still runs: two batches in flight
        slow_model.gate.set()
        assert [float(x[0]) for x in await asyncio.gather(first, second)] == [0.0, 2.0]
    assert slow_model.sizes == [1, 1]
    assert 0.019 <= waited < 0.5


async def test_second_batch_in_flight_starts_at_once_when_full(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    # max_wait_ms=100 keeps "at once" (< 50 ms) clearly apart from "after the wait".
    async with _batcher(slow_model, executor, batch_max_rows=4, max_wait_ms=100,
                        max_in_flight_batches=2) as b:
        first = asyncio.ensure_future(b.submit(_rows(1, 0.0)))
        await slow_model.started(1)
        submitted = time.monotonic()
        full = asyncio.ensure_future(b.submit(_rows(4, 10.0)))
        await slow_model.started(2)
        waited = slow_model.calls[1] - submitted
        slow_model.gate.set()
        await asyncio.gather(first, full)
    assert slow_model.sizes == [1, 4]
    assert waited < 0.05


async def test_no_more_than_max_in_flight_batches_run(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    async with _batcher(slow_model, executor, batch_max_rows=2, max_wait_ms=0,
                        max_in_flight_batches=2) as b:
        calls = [asyncio.ensure_future(b.submit(_rows(2, 10.0 * i))) for i in range(3)]
        await slow_model.started(2)
        await asyncio.sleep(0.05)
        assert len(slow_model.calls) == 2  # both slots busy: the third batch waits
        slow_model.gate.set()
        outputs = await asyncio.wait_for(asyncio.gather(*calls), 2)
    assert slow_model.sizes == [2, 2, 2]
    for i, out in enumerate(outputs):
        np.testing.assert_array_equal(out, [20.0 * i, 20.0 * i + 2])


# --- failures ------------------------------------------------------------------------------------


async def test_model_exception_reaches_every_caller_of_the_batch(
    executor: ThreadPoolExecutor,
) -> None:
    def fn(m: Matrix) -> Matrix:
        if (m[:, 0] < 0).any():
            raise ValueError("poison row")
        return m[:, 0] * 2

    model = FakeModel(fn, blocked=True)
    async with _batcher(model, executor, batch_max_rows=16) as b:
        plug = asyncio.ensure_future(b.submit(_rows(1, 0.0)))
        await model.started(1)
        victims = [asyncio.ensure_future(b.submit(_rows(2, base))) for base in (10.0, -5.0, 20.0)]
        await asyncio.sleep(0.01)
        model.gate.set()
        results = await asyncio.wait_for(
            asyncio.gather(*victims, return_exceptions=True), 2)
        np.testing.assert_array_equal(await plug, [0.0])
        # The batcher keeps working after a failed batch.
        after = await asyncio.wait_for(b.submit(_rows(3, 7.0)), 2)
    assert model.sizes == [1, 6, 3]
    for result in results:
        assert isinstance(result, ValueError)
        assert str(result) == "poison row"
    np.testing.assert_array_equal(after, [14.0, 16.0, 18.0])
    assert b.stats.failures == 1
    assert b.stats.batches == 2
    assert b.stats.rows == 4


async def test_wrong_number_of_outputs_is_a_runtime_error(
    executor: ThreadPoolExecutor,
) -> None:
    model = FakeModel(lambda m: m[:-1, 0])
    async with _batcher(model, executor) as b:
        with pytest.raises(RuntimeError, match="model returned 1 outputs for 2 rows"):
            await asyncio.wait_for(b.submit(_rows(2, 0.0)), 2)
    assert b.stats.failures == 1
    assert b.stats.batches == 0


async def test_rows_of_different_widths_fail_their_callers_instead_of_hanging(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    """Two callers whose matrices cannot be stacked must get an error, not wait forever.

    Every caller awaits a future that only the batch task resolves; an exception while building
    the batch matrix must therefore reach the callers like a model exception does.
    """
    async with _batcher(slow_model, executor) as b:
        plug = asyncio.ensure_future(b.submit(_rows(1, 0.0, width=3)))
        await slow_model.started(1)
        narrow = asyncio.ensure_future(b.submit(_rows(1, 1.0, width=3)))
        wide = asyncio.ensure_future(b.submit(_rows(1, 2.0, width=4)))
        await asyncio.sleep(0.01)
        slow_model.gate.set()
        await plug
        done, pending = await asyncio.wait({narrow, wide}, timeout=1.0)
        for task in pending:
            task.cancel()
        assert not pending, "callers of an unstackable batch were left waiting forever"
        for task in done:
            assert isinstance(task.exception(), ValueError)
        # And the batcher still serves later callers.
        np.testing.assert_array_equal(await asyncio.wait_for(b.submit(_rows(1, 4.0)), 1), [8.0])


# --- lifecycle -----------------------------------------------------------------------------------


async def test_submit_before_start_and_after_stop_raises(
    model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    b = _batcher(model, executor)
    with pytest.raises(RuntimeError, match="not running"):
        await b.submit(_rows(1, 0.0))
    await b.start()
    np.testing.assert_array_equal(await b.submit(_rows(1, 1.0)), [2.0])
    await b.stop()
    await b.stop()  # idempotent
    with pytest.raises(RuntimeError, match="not running"):
        await b.submit(_rows(1, 0.0))
    assert model.sizes == [1]


async def test_stop_flushes_pending_submissions(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    b = _batcher(slow_model, executor, batch_max_rows=4)
    await b.start()
    plug = asyncio.ensure_future(b.submit(_rows(1, 0.0)))
    await slow_model.started(1)
    pending = [asyncio.ensure_future(b.submit(_rows(3, 10.0 * i))) for i in range(1, 4)]
    await asyncio.sleep(0.01)
    stopping = asyncio.ensure_future(b.stop())
    await asyncio.sleep(0.01)
    assert not stopping.done()  # waits for the running and the pending batches
    slow_model.gate.set()
    await asyncio.wait_for(stopping, 2)
    assert all(f.done() for f in pending)
    np.testing.assert_array_equal(await plug, [0.0])
    for i, fut in enumerate(pending, start=1):
        np.testing.assert_array_equal(await fut, 2 * (10.0 * i + np.arange(3)))
    assert slow_model.sizes == [1, 4, 4, 1]
    with pytest.raises(RuntimeError):
        await b.submit(_rows(1, 0.0))


async def test_stop_does_not_wait_for_max_wait(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    b = _batcher(slow_model, executor, batch_max_rows=8, max_wait_ms=100,
                 max_in_flight_batches=2)
    await b.start()
    plug = asyncio.ensure_future(b.submit(_rows(1, 0.0)))
    await slow_model.started(1)
    waiting = asyncio.ensure_future(b.submit(_rows(1, 1.0)))  # would wait 100 ms for a slot
    await asyncio.sleep(0.005)
    stopped_at = time.monotonic()
    stopping = asyncio.ensure_future(b.stop())
    await slow_model.started(2)
    slow_model.gate.set()
    await asyncio.wait_for(stopping, 2)
    assert slow_model.calls[1] - stopped_at < 0.05
    assert float((await waiting)[0]) == 2.0
    assert float((await plug)[0]) == 0.0


async def test_context_manager_starts_and_stops(
    model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    async with _batcher(model, executor) as b:
        np.testing.assert_array_equal(await b.submit(_rows(2, 5.0)), [10.0, 12.0])
    with pytest.raises(RuntimeError):
        await b.submit(_rows(1, 0.0))


# --- input checks --------------------------------------------------------------------------------


async def test_empty_matrix_returns_empty_without_calling_fn(
    batcher: MicroBatcher, model: FakeModel
) -> None:
    out = await batcher.submit(np.empty((0, 3), dtype=np.float32))
    assert out.shape == (0,)
    assert out.dtype == np.float32
    assert model.calls == []
    assert batcher.stats.batches == 0


@pytest.mark.parametrize("shape", [(3,), (2, 3, 4), ()])
async def test_non_2d_input_is_rejected(
    batcher: MicroBatcher, model: FakeModel, shape: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="2-D"):
        await batcher.submit(np.zeros(shape, dtype=np.float32))
    assert model.calls == []


# --- stats ---------------------------------------------------------------------------------------


async def test_stats_count_batches_rows_and_histogram(
    batcher: MicroBatcher, model: FakeModel
) -> None:
    for n in (1, 2, 3, 8, 20):
        out = await asyncio.wait_for(batcher.submit(_rows(n, 0.0)), 2)
        assert out.shape == (n,)
    assert model.sizes == [1, 2, 3, 8, 8, 8, 4]
    assert batcher.stats.batches == 7
    assert batcher.stats.rows == 34
    assert batcher.stats.failures == 0
    assert batcher.stats.size_histogram == {1: 1, 2: 1, 4: 2, 8: 3}


# --- rows of other dtypes and widths, structured outputs, poison isolation ---------------------


def _pad_right(parts: Sequence[NDArray[np.int64]]) -> NDArray[np.int64]:
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1])), constant_values=-1)
                           for p in parts])


_TOP = np.dtype([("item", np.int64), ("score", np.float32)])


def _row_sums(m: NDArray[np.int64]) -> NDArray[np.void]:
    """A structured output per row: (sum of the non-pad ids, width seen) x 2 columns."""
    out = np.zeros((len(m), 2), dtype=_TOP)
    out["item"][:, 0] = np.where(m >= 0, m, 0).sum(axis=1)
    out["score"][:, 1] = m.shape[1]
    return out


async def test_combine_joins_rows_of_different_widths(
    slow_model: FakeModel, executor: ThreadPoolExecutor
) -> None:
    slow_model.fn = _row_sums  # type: ignore[assignment]
    b = MicroBatcher(slow_model, batch_max_rows=16, max_wait_ms=0, executor=executor,
                     combine=_pad_right)
    await b.start()
    try:
        first = asyncio.create_task(b.submit(np.array([[1, 2]], dtype=np.int64)))
        await slow_model.started(1)  # the next two queue up behind the running batch
        narrow = asyncio.create_task(b.submit(np.array([[3], [4]], dtype=np.int64)))
        wide = asyncio.create_task(b.submit(np.array([[5, 6, 7, 8]], dtype=np.int64)))
        await asyncio.sleep(0.01)
        slow_model.gate.set()
        results = [await first, await narrow, await wide]
    finally:
        await b.stop()
    assert slow_model.sizes == [1, 3]
    assert slow_model.inputs[1].tolist() == [[3, -1, -1, -1], [4, -1, -1, -1], [5, 6, 7, 8]]
    assert [r.dtype for r in results] == [_TOP] * 3
    assert [r["item"][:, 0].tolist() for r in results] == [[3], [3, 4], [26]]
    assert results[2]["score"][0, 1] == 4.0


def _fails_on_negative(m: Matrix) -> Matrix:
    if (m[:, 0] < 0).any():
        raise ValueError("negative input")
    return m[:, 0] * 2


async def test_submit_isolating_bisects_to_the_poison_rows(executor: ThreadPoolExecutor) -> None:
    from pipeline.batching.batcher import submit_isolating

    rows = _rows(10, 0.0)
    rows[3, 0] = rows[7, 0] = -1.0
    async with MicroBatcher(_fails_on_negative, batch_max_rows=64, max_wait_ms=0,
                            executor=executor) as b:
        pieces, failed = await submit_isolating(b, rows)
        assert b.stats.failures > 0
    assert [row for row, _ in failed] == [3, 7]
    assert all("negative input" in reason for _, reason in failed)
    scored = {start + i: float(v) for start, out in pieces for i, v in enumerate(out)}
    assert sorted(scored) == [0, 1, 2, 4, 5, 6, 8, 9]
    assert all(scored[i] == 2 * rows[i, 0] for i in scored)
    assert [start for start, _ in pieces] == sorted(start for start, _ in pieces)


async def test_submit_isolating_on_a_stopped_batcher_raises() -> None:
    from pipeline.batching.batcher import submit_isolating

    b = MicroBatcher(_double_first, batch_max_rows=4, max_wait_ms=0)
    with pytest.raises(RuntimeError, match="not running"):
        await submit_isolating(b, _rows(3, 0.0))


async def test_small_batches_run_inline_and_big_ones_in_the_executor(
    executor: ThreadPoolExecutor
) -> None:
    threads: list[tuple[int, str]] = []

    def fn(m: Matrix) -> Matrix:
        threads.append((len(m), threading.current_thread().name))
        return _double_first(m)

    b = MicroBatcher(fn, batch_max_rows=16, max_wait_ms=0, executor=executor,
                     inline_max_rows=3)
    assert not b.inline and b.inline_max_rows == 3
    async with b:
        for n in (1, 3, 4, 16):
            out = await b.submit(_rows(n, 10.0))
            assert out.tolist() == (2 * _rows(n, 10.0)[:, 0]).tolist()
    loop_thread = threading.current_thread().name
    assert [(n, name == loop_thread) for n, name in threads] == [
        (1, True), (3, True), (4, False), (16, False)]
    assert MicroBatcher(fn, batch_max_rows=8, max_wait_ms=0, inline=True).inline_max_rows == 8
    assert MicroBatcher(fn, batch_max_rows=8, max_wait_ms=0, inline_max_rows=50).inline
    with pytest.raises(ValueError, match="inline_max_rows"):
        MicroBatcher(fn, batch_max_rows=8, max_wait_ms=0, inline_max_rows=-1)
