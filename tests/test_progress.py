"""The progress reporter: bounded rate, done/total, rate and ETA, on a fake clock; the sink of the caller."""

import logging

import pytest

from realsyn.progress import Progress, format_duration, progress_to, track


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_reports_start_then_at_most_once_per_interval_then_the_end():
    clock, lines = FakeClock(), []
    p = Progress("image_embeddings a", 1000, unit="images", log=lines.append, min_interval_s=30, clock=clock)
    assert lines == ["image_embeddings a: started, 1000 images"]
    for _ in range(10):  # 100 images in 10 s: under the interval, silent
        clock.t += 1
        p.advance(10)
    assert len(lines) == 1
    clock.t += 20  # 30 s since the start line: one report
    p.advance(50)
    assert lines[-1] == "image_embeddings a: 150/1000 images (15.0%), 5.0 images/s, ETA 2m50s"
    clock.t += 29  # inside the next interval: nothing
    p.advance(100)
    assert len(lines) == 2
    clock.t += 1
    p.advance(0)
    assert lines[-1] == "image_embeddings a: 250/1000 images (25.0%), 4.2 images/s, ETA 3m00s"
    clock.t += 140
    p.advance(750)
    p.finish()
    p.finish()  # once only
    assert lines[-2:] == [
        "image_embeddings a: 1000/1000 images (100.0%), 5.0 images/s, ETA 0s",
        "image_embeddings a: finished 1000 images in 3m20s, 5.0 images/s",
    ]
    assert len(lines) == 5


def test_track_counts_each_item_by_its_size_once_the_loop_moves_on():
    clock, lines = FakeClock(), []
    batches = [[1] * 4, [1] * 4, [1] * 2]
    seen = []
    for batch in track(batches, "embed", total=10, unit="rows", size=len, log=lines.append, min_interval_s=5, clock=clock):
        seen.append(len(batch))
        clock.t += 5  # each batch takes 5 s: a report as the next one is asked for
    assert seen == [4, 4, 2]
    assert lines == [
        "embed: started, 10 rows",
        "embed: 4/10 rows (40.0%), 0.8 rows/s, ETA 8s",
        "embed: 8/10 rows (80.0%), 0.8 rows/s, ETA 2s",
        "embed: 10/10 rows (100.0%), 0.7 rows/s, ETA 0s",
        "embed: finished 10 rows in 15s, 0.7 rows/s",
    ]


def test_unknown_total_has_no_eta_and_len_is_the_default_total():
    clock, lines = FakeClock(), []
    p = Progress("ingest", None, unit="documents", log=lines.append, min_interval_s=0, clock=clock)
    clock.t += 4
    p.advance(2)
    assert lines == ["ingest: started, an unknown number of documents", "ingest: 2 documents done, 0.5 documents/s, 4s elapsed"]
    lines.clear()
    assert list(track(["a", "b", "c"], "x", log=lines.append, min_interval_s=3600, clock=clock)) == ["a", "b", "c"]
    assert lines == ["x: started, 3 items", "x: finished 3 items in 0s"]


def test_a_loop_stopped_by_an_error_says_so_and_does_not_report_finished():
    lines = []
    with pytest.raises(RuntimeError), Progress("dedup", 5, log=lines.append, min_interval_s=0, clock=FakeClock()) as p:
        p.advance(2)
        raise RuntimeError("boom")
    assert lines[-1] == "dedup: stopped by RuntimeError after 2 items"


def test_the_sink_comes_from_the_caller_else_from_python_logging(caplog, monkeypatch):
    lines = []
    with progress_to(lines.append):
        list(track(range(2), "inner", min_interval_s=0))
    assert lines[0] == "inner: started, 2 items" and len(lines) == 4
    with caplog.at_level(logging.INFO, logger="realsyn.progress"):
        list(track(range(1), "outside", min_interval_s=0))
    assert [r.getMessage() for r in caplog.records][0] == "outside: started, 1 items"
    monkeypatch.setenv("REALSYN_PROGRESS_INTERVAL_S", "fast")
    with pytest.raises(ValueError, match="REALSYN_PROGRESS_INTERVAL_S"):
        Progress("x", 1, log=lines.append)


def test_durations_are_short():
    assert [format_duration(s) for s in (0.4, 59, 61, 3599, 3600 * 5 + 125)] == ["0s", "59s", "1m01s", "59m59s", "5h02m"]


def test_a_dagster_step_reports_its_loops_to_its_run_log(monkeypatch):
    """The Dagster layer registers the running step's context.log.info: no change to the asset body."""
    import dagster as dg

    import assets.execution  # noqa: F401  (registers the step log as the progress sink)

    monkeypatch.setenv("REALSYN_PROGRESS_INTERVAL_S", "0")

    @dg.asset
    def counted() -> None:
        for _ in track(range(3), "counted rows", unit="rows"):
            pass

    instance = dg.DagsterInstance.ephemeral()
    assert dg.materialize([counted], instance=instance).success
    messages = [e.user_message for e in instance.all_logs(instance.get_runs()[0].run_id)]
    progress = [m for m in messages if m.startswith("counted rows")]
    assert progress[0] == "counted rows: started, 3 rows" and progress[-1].startswith("counted rows: finished 3 rows in ")
    assert len(progress) == 5  # start, one per row (no interval), end
