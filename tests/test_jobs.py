"""Jobs: stop, pause, refusal of a second job, and a UI fault that cannot kill a run."""
from __future__ import annotations

import time

import pytest

from sdstudio.errors import UserError
from sdstudio.events import Failed, Finished, Step
from sdstudio.jobs import JobManager


def _counting_work(n=200, delay=0.005):
    def work(ctx):
        for i in range(n):
            ctx.commands.check()
            ctx.emit(Step(step=i + 1, total=n, loss=1.0 / (i + 1), lr=1e-4))
            time.sleep(delay)
        return "ok"
    return work


def test_runs_to_the_end():
    job = JobManager().start("a", "train", _counting_work(20, 0))
    job.join(10)
    assert job.state == "finished" and job.result == "ok"
    assert len(job.log.snapshot()["steps"]) == 20


def test_the_job_ends_with_finished_carrying_the_files_its_work_returned(tmp_path):
    """The Job owns the end: work that returns paths (training does) gets them in Finished.outputs, so the
    same loop can also run as one stage inside a bigger job (the wizard) without ending it."""
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    job = JobManager().start("a", "train", lambda ctx: files)
    job.join(10)
    end = job.log.snapshot()["end"]
    assert isinstance(end, Finished) and end.outputs == tuple(map(str, files)) and not end.stopped
    job = JobManager().start("b", "train", lambda ctx: {"not": "paths"})
    job.join(10)
    assert job.log.snapshot()["end"].outputs == ()


def test_stop_and_pause():
    job = JobManager().start("a", "train", _counting_work())
    time.sleep(0.1)
    job.commands.pause()
    time.sleep(0.1)
    n = len(job.log.snapshot()["steps"])
    time.sleep(0.2)
    assert len(job.log.snapshot()["steps"]) <= n + 1 and job.state == "paused"
    job.stop()  # a paused job must still stop
    job.join(5)
    assert job.state == "stopped"
    assert isinstance(job.log.snapshot()["end"], Finished) and job.log.snapshot()["end"].stopped


def test_second_exclusive_job_refused():
    m = JobManager()
    job = m.start("first", "train", _counting_work())
    with pytest.raises(UserError, match="'first'.*still running"):
        m.start("second", "train", _counting_work())
    side = m.start("side", "caption", _counting_work(5, 0), exclusive=False)  # light work may run alongside
    job.stop()
    job.join(5)
    side.join(5)
    assert m.latest("train") is job and m.latest() is side


def test_listener_fault_does_not_kill_the_run():
    def broken_ui(ev):
        raise RuntimeError("the plot failed to draw")

    job = JobManager().start("a", "train", _counting_work(10, 0), listeners=[broken_ui])
    job.join(10)
    assert job.state == "finished"


def test_errors_become_one_sentence():
    def user_mistake(ctx):
        raise UserError("The dataset folder is empty: add images.")

    def bug(ctx):
        raise ValueError("boom\nsecond line")

    m = JobManager()
    a = m.start("a", "train", user_mistake).join(5)
    assert a.state == "failed" and a.log.snapshot()["end"].message == "The dataset folder is empty: add images."
    b = m.start("b", "train", bug).join(5)
    end = b.log.snapshot()["end"]
    assert isinstance(end, Failed) and "\n" not in end.message and "Traceback" in end.details


def test_foreground_exit_codes(capsys):
    from sdstudio.jobs import foreground_exit, run_foreground

    assert foreground_exit(run_foreground("ok", "x", _counting_work(2, 0))) is None
    with pytest.raises(UserError, match="empty"):  # a user mistake: the CLI prints one line and exits 2
        foreground_exit(run_foreground("u", "x", lambda ctx: (_ for _ in ()).throw(UserError("The folder is empty."))))

    def bug(ctx):
        raise ValueError("boom")

    assert foreground_exit(run_foreground("b", "x", bug)) == 1
    assert "error: ValueError: boom (run with -v" in capsys.readouterr().err
    assert foreground_exit(run_foreground("b", "x", bug), verbose=True) == 1
    assert "Traceback" in capsys.readouterr().err

    def stopped(ctx):
        ctx.commands.stop()
        ctx.commands.check()

    assert foreground_exit(run_foreground("s", "x", stopped), stopped_note="stopped; resume later") == 130
    assert "stopped; resume later" in capsys.readouterr().err
