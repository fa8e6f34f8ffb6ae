"""
Training the M runs of a WARP iteration side by side, as the paper does. Two ways:

- `WorkerPool`: `--workers N` processes started by torch.multiprocessing (spawn); by default one per
  visible CUDA device, worker w on cuda:w. Each worker loads the job's resources once, then takes
  (iteration, run) tasks from a queue: it reads θ_init from disk, trains the run and saves it
  (atomically) itself. Runs wait in the queue when M exceeds the workers. The parent only merges.
- `Group`: the ranks of `torchrun --nproc_per_node=K train.py ...`, on one machine or several. Rank r
  trains runs r, r + K, ...; the finished weights reach the root (the rank that holds the job folder,
  rank 0 unless another rank's --out_dir holds the job) through torch.distributed (gloo on CPU, NCCL
  on GPU); the root saves them, merges, and broadcasts the new θ_init to every rank. Only the root
  reads and writes files and logs: the other machines need no --out_dir.

Either way a run computes what it computes in the sequential loop: it depends only on θ_init, its
seed and the config (bit for bit on a CPU, given the same number of threads, --threads).

Stopping: SIGINT (Ctrl-C) or SIGTERM (what a scheduler sends before it kills a job) only raises a
flag (`stop_requested`); a run looks at it after each step and stops there (`Interrupted`). The pool
passes the signal on to its workers and waits for them; torchrun passes it on to its ranks itself.
"""

import multiprocessing
import os
import pickle
import queue
import traceback

import torch
import torch.distributed as dist

from nanowarp.signals import Interrupted, check_stop, stop_on_signals, stop_requested


class WorkerError(RuntimeError):
    """A worker process that failed or died; the finished runs are on disk."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, chained to it when the parent re-raises."""


def exit_if_orphaned():
    """In a worker whose parent was killed: stop now, rather than race a resumed job for the GPU."""
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        os._exit(1)


def _next_task(tasks):
    """The next (iteration, run) to train, or None: no more work, no parent to report to, or a stop."""
    while not stop_requested():
        try:
            return tasks.get(timeout=1.0)
        except queue.Empty:
            exit_if_orphaned()
    return None


def _portable(e):
    """The exception itself if it survives pickling (to raise it again in the parent), else its text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return WorkerError(f"{type(e).__name__}: {e}")


def _print_line(line):
    print(line + "\n", end="", flush=True)  # one write: the lines of two workers do not mix


def _worker(index, cfg, device, threads, tasks, results, load, train):
    torch.set_num_threads(threads)
    resources = None
    with stop_on_signals(main=False):
        while (task := _next_task(tasks)) is not None:
            iteration, run = task
            results.put((index, run, "started", None))
            try:
                resources = resources or load(cfg, torch.device(device))
                train(cfg, resources, iteration, run, _print_line)
            except Interrupted:
                results.put((index, run, "stopped", None))
                return
            except BaseException as e:
                results.put((index, run, "failed", (_portable(e), traceback.format_exc())))
                return
            results.put((index, run, "done", None))


def worker_devices(cfg, device, group):
    """The device of each worker process; at most one worker means training in this process."""
    if group.size > 1:
        if cfg.workers > 1:
            raise ValueError("--workers and torchrun both start processes: use one or the other")
        return []
    if device.type == "cuda" and device.index is None:  # "cuda" or "auto": every visible GPU
        devices = [torch.device("cuda", k) for k in range(torch.cuda.device_count())]
    else:
        devices = [device]
    n = min(cfg.workers or len(devices), cfg.runs)  # more workers than runs would idle
    return [devices[w % len(devices)] for w in range(n)] if n > 1 else []


class WorkerPool:
    """Worker processes that train and save runs; see the module docstring. Each worker calls
    load(cfg, device) once, for what its runs share (rl.load_resources), then train(cfg, loaded,
    iteration, run, log) for each run it takes (jobs.job.train_worker_run); both are module-level
    functions, which a spawned process imports by name."""

    def __init__(self, cfg, devices, threads, load, train):
        ctx = torch.multiprocessing.get_context("spawn")
        self.tasks, self.results = ctx.Queue(), ctx.Queue()
        self.devices = [str(d) for d in devices]
        self.procs = [ctx.Process(target=_worker, args=(w, cfg, d, threads, self.tasks, self.results, load, train),
                                  name=f"nanowarp-worker-{w}", daemon=True) for w, d in enumerate(self.devices)]
        for p in self.procs:
            p.start()

    def train(self, iteration, runs, on_done=lambda run: None):
        """Train and save these runs of `iteration`, calling on_done(run) as each one is saved.
        The first failure stops every worker and is raised here, with the worker's traceback. On a
        SIGINT / SIGTERM (stop_requested) the workers get it too; once they have stopped at the end
        of their step, Interrupted is raised here."""
        check_stop()  # the workers of a stopping job are gone
        for run in runs:
            self.tasks.put((iteration, run))
        pending, holding, stopping = set(runs), {}, 0  # holding: worker -> the run it trains
        while pending:
            if stop_requested() and not stopping:
                stopping = stop_requested()
                for p in self.procs:  # pass the signal on (with Ctrl-C they may have it already)
                    if p.is_alive():
                        os.kill(p.pid, stopping)
            try:
                w, run, event, error = self.results.get(timeout=1.0)
            except queue.Empty:
                dead = [w for w, p in enumerate(self.procs) if not p.is_alive() and (w in holding or not stopping)]
                if dead:
                    self._died(dead[0], iteration, holding)
                if stopping and not holding:
                    raise Interrupted(stopping)
                continue
            if event == "started":
                holding[w] = run
            elif event == "done":
                pending.discard(run)
                del holding[w]
                on_done(run)
            elif event == "stopped":
                del holding[w]
            else:
                self._failed(w, error)

    def _failed(self, w, error):
        self.terminate()
        exc, tb = error
        raise exc from RemoteTraceback(f"in worker {w} ({self.devices[w]}):\n{tb}")

    def _died(self, w, iteration, holding):
        """A worker gone without a word (SIGKILL, out of memory), unless its last words are still queued."""
        try:
            while True:
                w2, _, event, error = self.results.get(timeout=1.0)
                if event == "failed":
                    self._failed(w2, error)
        except queue.Empty:
            pass
        self.terminate()
        doing = f" while training iter_{iteration}/run_{holding[w]}" if w in holding else ""
        raise WorkerError(f"worker {w} ({self.devices[w]}) died with exit code {self.procs[w].exitcode}{doing} "
                          f"(killed, or out of memory?); the finished runs are on disk: "
                          f"run the same command again to resume") from None

    def terminate(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()  # SIGTERM would only ask it to stop at the end of its step
        for p in self.procs:
            p.join()

    def close(self):
        """Let the workers finish (they exit on a None task); stop any that does not."""
        for _ in self.procs:
            self.tasks.put(None)
        for p in self.procs:
            p.join(timeout=30)
        self.terminate()


def restart_warning():
    """Why torchrun --max_restarts may fail to restart this group, or None. Its c10d rendezvous shares
    one TCPStore with the ranks by default; a restarted group finds the last attempt's addresses there
    and cannot connect (torch 2.13, pytorch/pytorch#135712), unless torchrun does not share it."""
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and \
            os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("warning: torchrun --max_restarts: a restarted group may fail to connect through the store "
                "torchrun shares with it; set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment")
    return None


class Group:
    """The processes of this job: the ranks of torchrun, or this process alone (rank 0 of 1). One of
    them, `root` (rank 0 unless open_job chooses another), holds the job folder: it alone reads and
    writes it, and the others send it their runs and receive θ_init from it."""

    def __init__(self, rank=0, size=1, device=torch.device("cpu")):
        self.rank, self.size, self.device = rank, size, device
        self.root = 0

    @property
    def leader(self):
        return self.rank == self.root

    @classmethod
    def from_env(cls, device):
        """Join the torchrun job this process belongs to (WORLD_SIZE > 1), if any. On CUDA, rank r
        uses cuda:LOCAL_RANK and NCCL; otherwise gloo on the given device."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(device=device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    def close(self):
        if self.size > 1:
            # every rank done with every collective before any tears its group down: a rank that
            # exits while gloo still serves a peer aborts ("terminate called without an active exception")
            dist.barrier()
            dist.destroy_process_group()

    def gather_objects(self, obj):
        """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def everywhere(self, fn):
        """fn() on every rank; if it raised anywhere, every rank raises: its own exception, or the first
        rank's (rather than one rank stopping while the others wait for it in the next collective)."""
        try:
            result, error = fn(), None
        except Exception as e:
            result, error = None, e
        errors = [e for e in self.gather_objects(error if error is None else _portable(error)) if e is not None]
        if errors:
            raise errors[0] if error is None else error
        return result

    def on_leader(self, fn):
        """fn() computed on the root and returned on every rank; an exception is raised on every rank."""
        if self.size == 1:
            return fn()
        box = [None, None]  # result, exception
        if self.leader:
            try:
                box[0] = fn()
            except Exception as e:
                box[1] = _portable(e)
        dist.broadcast_object_list(box, src=self.root)
        if box[1] is not None:
            raise box[1]
        return box[0]

    def broadcast(self, theta):
        """The root's state dict on every rank (the others pass one with the same keys and shapes)."""
        if self.size == 1:
            return theta
        out = {}
        for k in sorted(theta):  # the same order on every rank
            t = theta[k].to(self.device, copy=True).contiguous()
            dist.broadcast(t, src=self.root)
            out[k] = t.cpu()
        return out

    def gather_runs(self, runs, theta, rows, like):
        """After rank r has trained runs[r] (its weights `theta`, its metric rows `rows`): the root
        receives the other ranks' runs and returns [(run, theta, rows)]; the other ranks return []."""
        received = []
        for src, run in enumerate(runs):
            if src == self.root:
                continue
            if self.leader:
                got = {}
                for k in sorted(like):
                    t = torch.empty(like[k].shape, dtype=like[k].dtype, device=self.device)
                    dist.recv(t, src=src)
                    got[k] = t.cpu()
                box = [None]
                dist.recv_object_list(box, src=src)
                received.append((run, {k: got[k] for k in like}, box[0]))
            elif self.rank == src:
                for k in sorted(like):
                    dist.send(theta[k].to(self.device).contiguous(), dst=self.root)
                dist.send_object_list([rows], dst=self.root)
        return received
