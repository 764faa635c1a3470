"""Run jobs on several threads while the memory they hold at once stays within a budget.

The writer computes whole-tensor kernels (TIES, SLERP, ...) this way: each job's cost is its working set, the
budget is the largest one's (what the plan promises as peak), so a model's many layer tensors are computed two
or more at a time while its largest tensor (the embeddings, say) is computed alone. Results do not depend on the
order: each job writes its tensor at an offset the plan fixed, and seeded kernels draw from generators seeded by
the tensor's name.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

Job = TypeVar("Job")


def run_within(jobs: Iterable[Job], cost: Callable[[Job], int], budget: int, workers: int,
               work: Callable[[Job], None]) -> None:
    """`work(job)` for every job, admitted in order, on up to `workers` threads, with the costs of the jobs
    running at once summing to at most `budget` (a job costing more runs alone). The first failure stops further
    admissions and is raised once the running jobs have ended."""
    admitted = threading.Condition()
    state = {"cost": 0, "running": 0, "failed": False}

    def run(job: Job, charge: int) -> None:
        try:
            work(job)
        except BaseException:
            with admitted:
                state["failed"] = True
            raise
        finally:
            with admitted:
                state["cost"] -= charge
                state["running"] -= 1
                admitted.notify_all()

    def room(charge: int) -> bool:
        return state["failed"] or state["running"] == 0 or (
            state["running"] < workers and state["cost"] + charge <= budget)

    futures: list[Future] = []
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="recipekit-compute") as pool:
        for job in jobs:
            charge = min(cost(job), budget)
            with admitted:
                admitted.wait_for(lambda: room(charge))
                if state["failed"]:
                    break
                state["cost"] += charge
                state["running"] += 1
            futures.append(pool.submit(run, job, charge))
    for future in futures:
        future.result()
