"""
The stages of a long pipeline (reproduce.py), each run once: a stage's result is recorded in
OUT/stages.json with the seconds it took, and a stage recorded there whose output still exists is
skipped when the pipeline runs again, so an interrupted pipeline resumes where it stopped. A stage
computed from another one (`after`) is redone when that one was redone since.

    stages = Stages(out_dir)
    counts = stages("prepare", "OUT/data/meta.json", prepare_data, after=["tokenizers"])
    stages.side_by_side([("sft", "OUT/sft/config.json", sft_stage, args), ...], workers=2, threads=1)
    stages.wall_time(list(stages.done))  # the seconds they took, side-by-side stages counted once
"""

import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import time

import torch

from nanowarp.hub import write_json
from nanowarp.signals import Interrupted, stop_on_signals, stop_requested

_WORKER = contextlib.ExitStack()  # a side-by-side process's signal handling, held for its life


def _start_worker(threads):
    """A side-by-side stage's process: its threads; SIGINT / SIGTERM stop its stage at the end of a step."""
    torch.set_num_threads(threads)
    _WORKER.enter_context(stop_on_signals(main=False))


def timed(fn, *fn_args):
    """(seconds it took, fn(*fn_args))."""
    start = time.perf_counter()
    result = fn(*fn_args)
    return time.perf_counter() - start, result


class Stages:
    """Runs the stages, prints the time of each, and records what they return in OUT/stages.json.
    A stage recorded there whose output still exists is skipped, unless a stage it is computed
    from (`after`) was redone since: then it is redone too."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, "stages.json")
        self.done = json.load(open(self.path)) if os.path.isfile(self.path) else {}
        self.ran = []  # stages this invocation ran

    def stale(self, name, after):
        """The stages among `after` redone since `name` was done: in this invocation, or later than
        it in an earlier one (every record holds the time it finished)."""
        mine = self.done.get(name, {}).get("finished_at")
        return [d for d in after if d in self.ran
                or (mine is not None and self.done.get(d, {}).get("finished_at", 0.0) > mine)]

    def is_done(self, name, output, after=()):
        if name in self.done and os.path.exists(output):
            redone = self.stale(name, after)
            if not redone:
                print(f"\n=== {name}: done earlier in {self.done[name]['seconds']:.0f}s, skipped", flush=True)
                return True
            print(f"\n=== {name}: done earlier, redone since {', '.join(redone)} changed", flush=True)
        return False

    def record(self, name, seconds, result, **extra):
        self.done[name] = dict(seconds=round(seconds, 1), result=result, finished_at=time.time(), **extra)
        self.ran.append(name)
        write_json(self.path, self.done)
        print(f"=== {name}: {seconds:.1f}s", flush=True)

    def __call__(self, name, output, fn, *fn_args, after=()):
        if not self.is_done(name, output, after):
            print(f"\n=== {name}", flush=True)
            self.record(name, *timed(fn, *fn_args))
        return self.done[name]["result"]

    def side_by_side(self, stages, workers, threads, after=()):
        """(name, output, fn, *fn_args) stages in `workers` processes at once (spawned: fn and its
        arguments are pickled); each stage's own time is recorded, and printed with the wall time.
        Inside signals.stop_on_signals, a SIGINT / SIGTERM sent to this process alone is passed on to
        the stages' processes; a stage stopped at the end of a step raises signals.Interrupted here,
        once the stages that finished are recorded."""
        todo = [s for s in stages if not self.is_done(*s[:2], after)]
        if workers <= 1 or len(todo) <= 1:
            for name, output, fn, *fn_args in todo:
                print(f"\n=== {name}", flush=True)
                self.record(name, *timed(fn, *fn_args))
            return
        print(f"\n=== {', '.join(s[0] for s in todo)}: side by side, one process each", flush=True)
        start = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), ctx,
                                                    initializer=_start_worker, initargs=(threads or 1,)) as pool:
            futures = [(name, pool.submit(timed, fn, *fn_args)) for name, _, fn, *fn_args in todo]
            passed_on = False
            while not all(future.done() for _, future in futures):
                concurrent.futures.wait([future for _, future in futures], timeout=0.2)
                if stop_requested() and not passed_on:  # a terminal's Ctrl-C reaches them too: a second is ignored
                    for child in multiprocessing.active_children():
                        os.kill(child.pid, stop_requested())
                    passed_on = True
        results, stopped = [], None
        for name, future in futures:
            try:
                results.append((name, *future.result()))
            except Interrupted as e:
                stopped = e
        wall, group = time.perf_counter() - start, " + ".join(s[0] for s in todo)
        for name, seconds, result in results:
            self.record(name, seconds, result, side_by_side=dict(group=group, wall=round(wall, 1)))
        if stopped:
            raise stopped
        print(f"=== {group}, side by side: {wall:.1f}s wall time", flush=True)

    def wall_time(self, names):
        """Seconds the stages took one after the other, a side-by-side group counted once, by its wall time."""
        groups = {self.done[n]["side_by_side"]["group"]: self.done[n]["side_by_side"]["wall"]
                  for n in names if "side_by_side" in self.done[n]}
        return sum(self.done[n]["seconds"] for n in names if "side_by_side" not in self.done[n]) + sum(groups.values())
