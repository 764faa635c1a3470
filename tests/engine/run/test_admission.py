"""run_within: jobs on several threads, never more memory at once than the budget, the first failure raised."""
from __future__ import annotations

import threading
import time

import pytest

from recipekit.engine.run.admission import run_within


def _tracked(costs: dict[str, int]):
    lock, state = threading.Lock(), {"now": 0, "peak": 0, "together": 0, "running": 0}
    done = []

    def work(job: str) -> None:
        with lock:
            state["now"] += costs[job]
            state["running"] += 1
            state["peak"] = max(state["peak"], state["now"])
            state["together"] = max(state["together"], state["running"])
        time.sleep(0.02)
        with lock:
            state["now"] -= costs[job]
            state["running"] -= 1
            done.append(job)

    return work, state, done


def test_small_jobs_run_together_and_the_largest_alone():
    costs = {"embed": 100, **{f"layer{i}": 30 for i in range(8)}, "head": 100}
    work, state, done = _tracked(costs)
    run_within(list(costs), costs.__getitem__, budget=100, workers=3, work=work)
    assert sorted(done) == sorted(costs)
    assert state["peak"] <= 100  # the largest job's working set, as the plan promises
    assert state["together"] == 3  # three 30s fit in 100 on three workers


def test_a_job_over_the_budget_runs_alone():
    costs = {"a": 10, "huge": 500, "b": 10}
    work, state, done = _tracked(costs)
    run_within(list(costs), costs.__getitem__, budget=100, workers=2, work=work)
    assert sorted(done) == ["a", "b", "huge"]


def test_the_first_failure_stops_admission_and_is_raised():
    started = []

    def work(job: int) -> None:
        started.append(job)
        if job == 2:
            raise ValueError("job 2 failed")
        time.sleep(0.01)

    with pytest.raises(ValueError, match="job 2 failed"):
        run_within(range(100), lambda job: 60, budget=100, workers=2, work=work)
    assert len(started) < 10


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_a_merge_gives_the_same_bytes_on_one_thread_and_on_several(tmp_path, monkeypatch, method):
    from recipekit.engine.cli import main
    from recipekit.engine.run import admission, shards
    from tests.tiny import finetune, make_model, write_recipe

    base = make_model(tmp_path / "base", layers=4, seed=1)
    finetune(base, tmp_path / "other", seed=2)
    parameters = "parameters: {t: 0.3}" if method == "slerp" else "parameters: {density: 0.5, weight: 0.7}"
    recipe = write_recipe(tmp_path, f"""
        recipe: 1
        models: {{base: base, other: other}}
        steps:
          - op: merge
            method: {method}
            base: base
            models: [{{model: other}}]
            {parameters}
            seed: 3
        """)
    together = []
    real = admission.run_within

    def spy(jobs, cost, budget, workers, work):
        lock, state = threading.Lock(), {"running": 0}

        def counted(job):
            with lock:
                state["running"] += 1
                together.append(state["running"])
            try:
                time.sleep(0.002)
                work(job)
            finally:
                with lock:
                    state["running"] -= 1

        real(jobs, cost, budget, workers, counted)

    monkeypatch.setattr(shards, "run_within", spy)
    outputs = []
    for threads in (1, 4):
        monkeypatch.setattr(shards, "copy_threads", lambda threads=threads: threads)
        out = tmp_path / f"out{threads}"
        assert main(["run", str(recipe), "-o", str(out), "-q", "--no-lock"]) == 0
        outputs.append({p.name: p.read_bytes() for p in out.glob("*.safetensors")})
    assert outputs[0] == outputs[1]
    assert max(together) > 1  # with 4 threads, layer tensors were computed at the same time
