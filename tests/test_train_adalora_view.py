"""The Train tab's AdaLoRA view: each layer's rank as bars and the budget schedule with the run's total rank now,
drawn from what the AdaLoRA method reports with each Step (its `after_optimizer_step` hook)."""
from __future__ import annotations

from types import SimpleNamespace

from sdstudio.events import Step
from sdstudio.jobs import RunLog
from sdstudio.ui.train_tab import job_view, short_layer


def test_rank_bars_and_budget_schedule_from_the_last_step():
    log = RunLog()
    schedule = {"start": 24, "end": 8, "tinit": 2, "tfinal": 3, "total": 10}
    ranks = {"down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": 1,
             "mid_block.attentions.0.transformer_blocks.0.ff.net.2": 5, "up_blocks.3.attentions.2.proj_out": 2}
    log.add(Step(step=1, total=10, loss=0.1, lr=1e-4))
    log.add(Step(step=7, total=10, loss=0.1, lr=1e-4, extra={"ranks": ranks, "total_rank": 8, "budget": 8,
                                                              "schedule": schedule}))
    v = job_view(SimpleNamespace(log=log, name="run"))
    bars, budget = v["ranks"], v["budget"]
    assert list(bars["layer"]) == ["d1.a0.t0.attn2.k", "m.a0.t0.ff2", "u3.a2.proj_out"]
    assert list(bars["rank"]) == [1, 5, 2]
    line = budget[budget.series == "budget schedule"]
    assert list(line.step) == list(range(1, 11))
    assert line["total rank"].iloc[0] == 24 and line["total rank"].iloc[-1] == 8  # warm-up, then the target
    assert list(line["total rank"]) == sorted(line["total rank"], reverse=True)  # the budget only falls
    now = budget[budget.series == "total rank now"]
    assert list(now.step) == [7] and list(now["total rank"]) == [8]


def test_other_methods_draw_no_adalora_view():
    log = RunLog()
    log.add(Step(step=1, total=10, loss=0.1, lr=1e-4))
    v = job_view(SimpleNamespace(log=log, name="run"))
    assert v["ranks"] is None and v["budget"] is None
    assert short_layer("up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0") == "u1.a2.t0.attn1.out"
