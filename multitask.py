"""Multi-task fine-tuning as a composition on the data and loss side: one encoder, one head per task
(model.MultiTaskClassifier), and one stream of micro-batches in which each optimizer step belongs to one
task, drawn from a fixed distribution over tasks. trainer.train runs it like any other task. Read beside
docs/finetuning.md ("Multi-task fine-tuning").

    specs   = parse_tasks(["sst2:binary:train.tsv:dev.tsv", "stsb:regression:train.tsv"])
    p       = sampling_probabilities([67349, 5749], "temperature", 2.0)      # [eq:task-sampling]
    sampler = TaskSampler(p, seed=1)                 # step -> (task, how many earlier steps drew that task)
    data    = MultiTaskData({"sst2": TaskDataset(...), "stsb": TaskDataset(...)}, sampler)
    batch   = data.micro_batch(step, index)          # task t's own next micro-batch, batch["task"] = t

Every micro-batch of a step (all accumulation slots, all ranks) comes from the step's task, so the loop's
normalisation by the step's real targets makes each step's loss that task's mean loss, exactly as in a
single-task run of that task. A task walks through its own epochs in order: its k-th step reads its k-th
micro-batches (TaskDataset.micro_batch(k, index)), so proportional sampling shows every task the same number
of epochs. Everything is a pure function of (seed, step): resuming needs no sampler state.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from config import SAMPLING
from finetuned import TASKS, FinetuneError

NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass(frozen=True)
class TaskSpec:
    name: str                      # the head's name and the sub-folder of the output: sst2, stsb, ...
    kind: str                      # a row of finetuned.TASKS: binary, multiclass, pair, regression
    train: list[str]
    dev: list[str] | None


def parse_tasks(specs: list[str]) -> list[TaskSpec]:
    """--tasks NAME:KIND:TRAIN[:DEV] ...; TRAIN and DEV may each be several files joined by commas."""
    kinds = [k for k, v in TASKS.items() if v.head == "classifier"]
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (3, 4) or not all(parts):
            raise FinetuneError(f"--tasks {spec!r}: expected NAME:KIND:TRAIN[:DEV] (files comma-separated), "
                                "e.g. sst2:binary:sst2/train.tsv:sst2/dev.tsv")
        name, kind, train, dev = (parts + [None])[:4]
        if not NAME.fullmatch(name):
            raise FinetuneError(f"--tasks {spec!r}: the name {name!r} must be lower-case letters, digits, _ or - "
                                "(it names a head and a folder)")
        if kind not in kinds:
            raise FinetuneError(f"--tasks {spec!r}: the kind {kind!r} must be one of {', '.join(kinds)}")
        if name in {s.name for s in out}:
            raise FinetuneError(f"--tasks: the name {name!r} is given twice")
        out.append(TaskSpec(name, kind, train.split(","), dev.split(",") if dev else None))
    if len(out) < 2:
        raise FinetuneError(f"--tasks: expected two or more tasks, got {len(out)} (one task: use --task)")
    return out


def sampling_probabilities(sizes, method: str = "proportional", temperature: float = 1.0) -> np.ndarray:
    """p_t, the chance that a step trains task t, from the tasks' training-set sizes n_t:

        p_t = n_t^(1/T) / sum_s n_s^(1/T)                                             [eq:task-sampling]

    proportional is T = 1 (every example equally likely, whichever task it is in); T > 1 flattens the
    distribution towards uniform (T -> inf), giving small tasks more steps than their size alone would."""
    if method not in SAMPLING:
        raise FinetuneError(f"--task-sampling: expected one of {', '.join(SAMPLING)}, got {method!r}")
    T = 1.0 if method == "proportional" else temperature
    if not T > 0:
        raise FinetuneError(f"--sampling-temperature: expected a value > 0, got {temperature}")
    n = np.asarray(sizes, dtype=np.float64)
    w = np.exp(np.log(n) / T)          # n^(1/T) through logs: no overflow for large n and small T
    return w / w.sum()


class TaskSampler:
    """Which task step s trains, and k: how many earlier steps drew that task, so the task reads its own
    k-th batch. Steps are drawn in blocks of BLOCK from numpy generators seeded (seed, block, 2), a pure
    function of (seed, step); the per-block counts are cached so finding k costs one block, not s steps."""

    BLOCK = 1024

    def __init__(self, probabilities, seed: int):
        self.p, self.seed = np.asarray(probabilities, dtype=np.float64), seed
        self._blocks = {}                                # block -> its tasks (a cache)
        self._before = [np.zeros(len(self.p), dtype=np.int64)]   # [b]: per-task counts in blocks < b

    def block(self, b: int) -> np.ndarray:
        if b not in self._blocks:
            rng = np.random.default_rng([self.seed, b, 2])
            self._blocks = {k: v for k, v in self._blocks.items() if k >= b - 1}
            self._blocks[b] = rng.choice(len(self.p), size=self.BLOCK, p=self.p)
        return self._blocks[b]

    def __call__(self, step: int) -> tuple[int, int]:
        """(task index, k) for `step`."""
        b, i = divmod(step, self.BLOCK)
        while len(self._before) <= b:                    # extend the running counts up to block b
            c = len(self._before) - 1
            self._before.append(self._before[c] + np.bincount(self.block(c), minlength=len(self.p)))
        tasks = self.block(b)
        t = int(tasks[i])
        return t, int(self._before[b][t] + np.count_nonzero(tasks[:i] == t))

    def counts(self, steps: int) -> np.ndarray:
        """How many of the first `steps` steps each task got."""
        if steps == 0:
            return np.zeros(len(self.p), dtype=np.int64)
        self(steps - 1)                                  # extends the running counts to the last block
        b = (steps - 1) // self.BLOCK
        return self._before[b] + np.bincount(self.block(b)[:(steps - 1) % self.BLOCK + 1], minlength=len(self.p))


class MultiTaskData:
    """The trainer's data (micro_batch(step, index)) over several tasks' TaskDatasets: step s belongs to
    the sampler's task t, and reads that task's k-th step's micro-batch. batch["task"] names the task, the
    loss function picks the head and the loss with it."""

    def __init__(self, datasets: dict, sampler: TaskSampler):
        self.datasets, self.names, self.sampler = datasets, list(datasets), sampler

    def micro_batch(self, step: int, index: int) -> dict:
        t, k = self.sampler(step)
        name = self.names[t]
        return {**self.datasets[name].micro_batch(k, index), "task": name}

    def steps_per_task(self, steps: int) -> dict[str, int]:
        return dict(zip(self.names, map(int, self.sampler.counts(steps))))
