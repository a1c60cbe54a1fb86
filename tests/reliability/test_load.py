"""Load: while a training runs, 4 browser clients queue 20 generations each through the Playground's Generate
endpoint of the running app (Gradio's own client, over HTTP). None of them crashes or is refused; the
generations wait for the GPU and are then served one at a time, in the order they arrived (each client's in
its own order); every image is written; and the process's memory and thread count are flat afterwards. A second
training started meanwhile is refused with a message naming the first, never run on top of it.
"""
from __future__ import annotations

import gc
import os
from pathlib import Path
import threading
import time

import psutil
import pytest

from inprocess_app import serve
from sdstudio.errors import UserError
from sdstudio.events import Failed, Finished
from train_helpers import make_kohya_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLIENTS, PER_CLIENT = 4, 20
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from sdstudio.workspace import Workspace

    ws = Workspace.open(tmp_path_factory.mktemp("load") / "ws")
    make_kohya_dataset(ws.root / "datasets" / "ds", n=2)
    served = serve(ws)
    yield served.ctx, served.url
    served.close()


def _generate_args(client, prompt: str, seed: int) -> list:
    """The Generate endpoint's inputs: its defaults, with a small fast recipe written over them."""
    from sdstudio.ui.playground_tab import PAGE_FIELDS

    if not hasattr(client, "_params"):
        client._params = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/generate"][
            "parameters"]
    args = [p.get("parameter_default") if p.get("parameter_has_default") else "" for p in client._params]
    first_form = 3  # fuse, grid x, grid y, then the form in PAGE_FIELDS order (the image editor in place of the
    # init image and mask), then the Boxes panel and the stack's cards
    for key, value in dict(base_model="tiny", prompt=prompt, sampler="euler", steps=1, cfg=5.0, seed=seed, width=64,
                           height=64, batch=1, editor=None).items():
        args[first_form + PAGE_FIELDS.index(key)] = value
    return args


def _start_paced_training(ctx, values: dict):
    """A training as the Train tab starts it (load_config, preflight, train as a Job of the app's JobManager), with
    the LoRA method's steps paced by a 0.25 s sleep: it really trains and holds the GPU, but the CPU it takes does
    not grow with how long the clients take to queue, so the test costs the same on a busy and an idle machine."""
    from sdstudio.methods.lora import Lora
    from sdstudio.train.config import load_config
    from sdstudio.train.loop import preflight, train

    class PacedLora(Lora):
        def loss(self, c, batch, step):
            time.sleep(0.25)
            return super().loss(c, batch, step)

    ws = ctx.workspace
    cfg = load_config(None, extra={**values, "dataset": str(ws.root / "datasets" / "ds"),
                                   "output_dir": str(ws.run_dir(values["output_name"]))})
    pre = preflight(cfg, home=ws.root)
    return ctx.jobs.start(cfg.output_name, "train",
                          lambda jc: train(cfg, jc.emit, jc.commands, checked=pre, method=PacedLora()))


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.slow
def test_four_clients_queue_twenty_generations_while_training(app, capsys):
    from gradio_client import Client

    from sdstudio.ui.train_tab import start_run

    ctx, url = app
    outputs = ctx.workspace.root / "outputs"
    # Warm up: one generation loads the Playground's base, so the memory figures below compare like with like.
    warm = Client(url, verbose=False, httpx_kwargs={"timeout": 300})
    warm.predict(*_generate_args(warm, "warm up", 999), api_name="/generate")
    _wait(lambda: not ctx.jobs.running(), 300)
    rss0 = _rss_mb()

    values = {"method": "lora", "base_model": "tiny", "dataset": "datasets/ds", "output_name": "busy",
              "resolution": 64, "max_steps": 100_000, "save_every": 0, "sample_every": 0, "sample_steps": 1,
              "device": "cpu"}
    training = _start_paced_training(ctx, values)
    _wait(lambda: training.log.snapshot()["last_step"] is not None, 300)  # it is really training

    errors: list[BaseException] = []

    def client_work(c: int) -> None:
        try:
            client = Client(url, verbose=False, httpx_kwargs={"timeout": 300})
            for i in range(PER_CLIENT):
                client.predict(*_generate_args(client, f"client {c} image {i}", 1000 * c + i), api_name="/generate")
        except BaseException as exc:  # noqa: BLE001 - any failure of a client is the finding
            errors.append(exc)

    threads = [threading.Thread(target=client_work, args=(c,)) for c in range(CLIENTS)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    queued_s = time.time() - t0
    assert not errors, errors
    generations = [j for j in ctx.jobs._jobs if j.kind == "generate"][1:]  # (the warm-up is first)
    assert len(generations) == CLIENTS * PER_CLIENT
    assert training.running and training.state == "running", "the training must still hold the GPU"
    assert all(j.state == "queued" for j in generations), [j.state for j in generations]
    # A second training while one runs: refused with a message that names the first.
    with pytest.raises(UserError, match="'busy' \\(train\\) is still running"):
        start_run(ctx, {**values, "output_name": "second"}, None)

    training.stop()  # the GPU is handed on: the queue is served
    _wait(lambda: sum(j.log.snapshot()["end"] is not None for j in generations) >= PER_CLIENT, 900)
    rss_mid = _rss_mb()  # a quarter served: what the rest adds is what each generation keeps
    _wait(lambda: all(j.log.snapshot()["end"] is not None for j in generations), 900)
    served_s = time.time() - t0 - queued_s
    ends = [j.log.snapshot()["end"] for j in generations]
    assert isinstance(training.log.snapshot()["end"], Finished) and training.log.snapshot()["end"].stopped
    assert not [e for e in ends if isinstance(e, Failed)], [e.message for e in ends if isinstance(e, Failed)]
    # Served one at a time, in arrival order: each got the GPU after the one before it had ended.
    assert generations[0].granted_at >= training.ended_at
    for a, b in zip(generations, generations[1:]):
        assert b.granted_at >= a.ended_at, "two generations ran at once, or out of order"
    by_client = {}
    for j in generations:  # each client's requests in its own order
        seed = int(j.log.snapshot()["end"].outputs[0].rsplit("-", 1)[-1].split(".")[0])
        by_client.setdefault(seed // 1000, []).append(seed % 1000)
    assert by_client == {c: list(range(PER_CLIENT)) for c in range(CLIENTS)}, by_client
    assert len(list(outputs.glob("*.png"))) == CLIENTS * PER_CLIENT + 1

    _wait(lambda: not ctx.jobs.running(), 120)
    rss1 = _rss_mb()
    job_threads = [t.name for t in threading.enumerate() if t.name.startswith("sdstudio-")]
    with capsys.disabled():
        print(f"\nload: {CLIENTS} clients x {PER_CLIENT} generations queued in {queued_s:.1f} s behind a training, "
              f"0 refused, 0 failed, served in order in {served_s:.1f} s; RSS {rss0:.0f} MB before, {rss_mid:.0f} "
              f"after the first {PER_CLIENT}, {rss1:.0f} after all ({rss1 - rss_mid:+.0f} MB for the last "
              f"{(CLIENTS - 1) * PER_CLIENT}); job threads left: {len(job_threads)}")
    assert rss1 - rss_mid < 0.5 * (CLIENTS - 1) * PER_CLIENT, (rss_mid, rss1)  # flat: < 0.5 MB per generation
    assert rss1 - rss0 < 200, (rss0, rss1)  # the training's memory went back too (allocator slack allowed)
    assert job_threads == []


def test_a_queued_generation_can_be_stopped_and_the_queue_goes_on():
    """Stop on a queued job ends it at once as stopped; the jobs behind it still run in order."""
    from sdstudio.jobs import JobManager

    m = JobManager()
    gate = threading.Event()
    first = m.start("train", "train", lambda ctx: gate.wait(30))
    order = []
    queued = [m.start(f"g{i}", "generate", lambda ctx, i=i: order.append(i), queue=True) for i in range(4)]
    _wait(lambda: all(j.state == "queued" for j in queued), 10)
    assert "queued: 2 ahead" in queued[1].log.snapshot()["status"]
    queued[1].stop()
    _wait(lambda: queued[1].log.snapshot()["end"] is not None, 10)
    assert queued[1].state == "stopped"
    gate.set()
    for j in queued:
        j.join(30)
    first.join(30)
    assert order == [0, 2, 3] and [j.state for j in queued] == ["finished", "stopped", "finished", "finished"]
    holder = m.start("t1", "train", lambda ctx: time.sleep(0.5))
    with pytest.raises(UserError, match="'t1'"):  # without queue=True: refused while another holds the GPU
        m.start("t2", "train", lambda ctx: None)
    holder.join(30)


def _wait(cond, timeout: float) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s")


def test_a_second_process_cannot_train_the_same_run(tmp_path):
    """The app's JobManager refuses a second training in the app; a second *process* (`sdstudio train` beside the
    app, two app instances) on the same run folder is refused by the run's lock, and a kill -9 of the holder
    frees it."""
    import signal
    import subprocess
    import sys

    from sdstudio.train.config import load_config
    from sdstudio.train.loop import train
    from train_helpers import fast_sets

    ds = make_kohya_dataset(tmp_path / "ds", n=2)
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom sdstudio.train.checkpoint import run_lock\n"
         "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n", str(run)],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = load_config("character-lora-sd15", fast_sets(ds, run, max_steps=1))
        with pytest.raises(UserError, match=f"being trained right now \\(process {holder.pid}\\)"):
            train(cfg, lambda e: None)
        assert not (run / "log.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train(cfg, lambda e: None)  # the kill released it
    assert (run / "character-lora.safetensors").is_file()


def test_a_fault_while_cleaning_up_never_blocks_the_queue(monkeypatch):
    """The GPU is handed on in a `finally`: a job whose memory cleanup fails still lets the next one run."""
    import sdstudio.jobs as jobs

    def broken(full=True):
        raise RuntimeError("the allocator is unhappy")

    monkeypatch.setattr(jobs, "_free_memory", broken)
    m = jobs.JobManager()
    first = m.start("a", "generate", lambda ctx: time.sleep(0.2), queue=True)
    second = m.start("b", "generate", lambda ctx: "ran", queue=True)
    second.join(30)
    assert first.state == "finished" and second.state == "finished" and second.result == "ran"
