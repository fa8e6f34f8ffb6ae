"""Faults beyond kill -9, each injected for real on the tiny job: a full disk (a lowered
RLIMIT_FSIZE: writes fail with EFBIG), SIGINT and SIGTERM sent to train.py, a second process on the
job folder, a damaged job folder (bytes cut off its files), and merge.py / eval.py cut short. Each
keeps what was finished, says what to do, and a rerun reaches the uninterrupted result."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import load_file

import eval as eval_cli
import merge
import nanowarp.jobs.folder as job_module
import train
from conftest import (ITERATIONS, ROOT, RUNS, STEPS, Killed, assert_same_weights, final_weights, in_process, leftovers,
                      perturbed_copy, stop_at)
from nanowarp import hub
from nanowarp.config import parse_args
from nanowarp.jobs.folder import is_complete, lock_out_dir
from nanowarp.signals import Interrupted, stop_on_signals
from nanowarp.warp import warp


def run_with_file_size_limit(script, args, limit):
    """`python script args` in a subprocess whose files cannot grow beyond `limit` bytes (EFBIG)."""
    def lower_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                          preexec_fn=lower_limit, timeout=300)


def temporary_files(folder):
    return [os.path.join(d, n) for d, subfolders, files in os.walk(folder) for n in files + subfolders
            if n.startswith(".tmp")]


def snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, files in os.walk(folder) for n in files}


def assert_job_ends_as_uninterrupted(flags, reference, out_dir):
    """The same command again (here, to save a process start) ends with the uninterrupted weights."""
    assert in_process(train.main, flags) == 0
    assert_same_weights(final_weights(out_dir), reference)
    assert leftovers(out_dir) == []
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        steps = sorted((r["iteration"], r["run"], r["step"]) for r in map(json.loads, f))
    assert steps == [(i, m, t) for i in range(1, ITERATIONS + 1) for m in range(RUNS) for t in range(1, STEPS + 1)]


# ---- a full disk ------------------------------------------------------------------------------

@pytest.mark.parametrize("killed_at, fails_at", [
    ("iter_1/run_0/saved", "iter_1/run_1"),  # at a run's save
    ("iter_1/run_1/saved", "iter_1/slerp"),  # at the merge: the runs are done
])
def test_a_full_disk_keeps_what_is_finished_and_a_rerun_resumes(job_flags, reference, tmp_path, monkeypatch, killed_at,
                                                                 fails_at):
    flags = job_flags + ["--out_dir", str(tmp_path)]
    with monkeypatch.context() as patch, pytest.raises(Killed):  # the job stopped after some runs
        stop_at(patch, killed_at)
        in_process(train.main, flags)
    finished = {name: snapshot(tmp_path / "iter_1" / name) for name in os.listdir(tmp_path / "iter_1")
                if is_complete(tmp_path / "iter_1" / name)}
    size = len(finished["run_0"]["model.safetensors"])
    full = run_with_file_size_limit("train.py", flags, size - 1)  # no more checkpoints fit
    assert full.returncode == 2, full.stderr
    err = full.stderr
    assert f"cannot write model.safetensors to {tmp_path / fails_at}: File too large" in err
    assert f"free at least {hub.format_size(size)} there" in err and "run the same command again" in err
    assert temporary_files(tmp_path) == [] and not is_complete(tmp_path / fails_at)
    assert {name: snapshot(tmp_path / "iter_1" / name) for name in finished} == finished  # not a byte lost
    assert_job_ends_as_uninterrupted(flags, reference, str(tmp_path))


def test_a_full_disk_at_a_state_save_stops_the_job_and_a_rerun_resumes(job_flags, reference, tmp_path):
    flags = job_flags + ["--out_dir", str(tmp_path), "--save_every", "1"]
    full = run_with_file_size_limit("train.py", flags, 8192)  # job.json fits, the first state.pt does not
    assert full.returncode == 2, full.stderr
    assert f"cannot write state.pt to {tmp_path / 'iter_1' / 'run_0'}: File too large" in full.stderr
    assert temporary_files(tmp_path) == [] and not os.path.exists(tmp_path / "iter_1" / "run_0" / "state.pt")
    assert_job_ends_as_uninterrupted(flags, reference, str(tmp_path))


@pytest.fixture(scope="module")
def policies(tiny_gpt2_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("policies")
    return [perturbed_copy(tiny_gpt2_dir, str(folder / name), seed) for seed, name in enumerate("ab")]


@pytest.mark.parametrize("existing", [True, False])
def test_a_full_disk_in_merge_py_leaves_out_as_it_was(tiny_gpt2_dir, policies, tmp_path, existing):
    out = tmp_path / "merged"
    args = ["--init", tiny_gpt2_dir, "--policies", *policies, "--out", str(out)]
    if existing:
        merge.main(args + ["--eta", "0.5"])
        (out / "notes.txt").write_text("not merge.py's")
    before = snapshot(tmp_path)
    size = os.path.getsize(os.path.join(policies[0], "model.safetensors"))
    full = run_with_file_size_limit("merge.py", args + ["--eta", "1"], size - 1)
    assert full.returncode == 2 and full.stderr.startswith("merge.py: error: "), full.stderr
    assert "cannot write model.safetensors" in full.stderr and f"free at least {hub.format_size(size)}" in full.stderr
    assert snapshot(tmp_path) == before and temporary_files(tmp_path) == []  # not a byte changed
    merge.main(args + ["--eta", "1"])  # space freed: the same command writes it
    assert is_complete(out) and (out / "notes.txt").exists() == existing
    assert (out / "model.safetensors").read_bytes() != before.get("merged/model.safetensors")


# ---- SIGINT and SIGTERM ---------------------------------------------------------------------

def start_train_py(flags, tag, torchrun=False):
    """train.py (under torchrun with 2 ranks) in its own session (so that a signal to its group reaches
    no test process), tagged through its environment so that its processes and their children can be found."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if torchrun \
        else [sys.executable]
    return subprocess.Popen([*launcher, os.path.join(ROOT, "train.py"), *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "NANOWARP_TEST_TAG": tag})


def wait_for_line(proc, text):
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed:\n{''.join(lines)}\n{proc.stderr.read()}")


def processes_tagged(tag):
    """Processes alive with NANOWARP_TEST_TAG=tag in their environment."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"NANOWARP_TEST_TAG={tag}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.parametrize("signum, how", [
    (signal.SIGINT, "sequential"),  # Ctrl-C: the terminal signals the whole process group
    (signal.SIGTERM, "workers"),  # a scheduler: the main process only; it stops its 2 workers
    (signal.SIGTERM, "torchrun"),  # to torchrun, which passes it on to its 2 ranks
])
def test_a_signal_stops_the_job_at_a_step_end_and_a_rerun_resumes(job_flags, reference, tmp_path, signum, how):
    flags = job_flags + ["--out_dir", str(tmp_path), "--save_every", "100"]  # a state only when stopped
    tag = uuid.uuid4().hex
    proc = start_train_py(flags + (["--workers", "2"] if how == "workers" else []), tag, torchrun=how == "torchrun")
    try:
        wait_for_line(proc, "iter 1/2 run 2/2 step    1/3" if how == "sequential" else "step    1/3")
        (os.killpg if how == "sequential" else os.kill)(proc.pid, signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    if how == "torchrun":  # torchrun reports the signal its way; the ranks exit with 128 + signum
        assert proc.returncode != 0, err
    else:
        assert proc.returncode == 128 + signum, err
    # where it stopped depends on when the signal came: inside a run (stopped after step t), or between
    # runs when they had reached their last step (the deterministic case is the test below)
    assert f"stopped by {signal.Signals(signum).name}" in err and "run the same command again to resume" in err
    for _ in range(50):  # workers: gone with their parent, no orphan
        if not processes_tagged(tag):
            break
        time.sleep(0.2)
    assert processes_tagged(tag) == []
    assert temporary_files(tmp_path) == [] and not (tmp_path / "iter_2" / "liti").exists()
    for line in out.splitlines():  # a run stopped inside saved its state where it stopped
        if "stopped after step" in line and f"/{STEPS};" in line and "training state is in" in line:
            step, path = int(line.split("stopped after step ")[1].split("/")[0]), line.split(" is in ")[1]
            assert torch.load(path, weights_only=True)["step"] == step
    assert_job_ends_as_uninterrupted(flags, reference, str(tmp_path))


def test_a_sigint_saves_the_state_of_the_run_where_it_stops(job_flags, reference, tmp_path, monkeypatch):
    def kill_point(name):  # a real SIGINT, to this process, after step 1 of run 1
        if name == "iter_1/run_1/step_1":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(job_module, "kill_point", kill_point)
    cfg = parse_args(job_flags + ["--out_dir", str(tmp_path), "--save_every", "100"])
    lines = []
    with stop_on_signals(), pytest.raises(Interrupted) as stopped:
        in_process(warp, cfg, None, lines.append)
    assert (stopped.value.exit_code, stopped.value.step) == (130, 1)
    state = tmp_path / "iter_1" / "run_1" / "state.pt"
    assert f"iter 1 run 2: stopped after step 1/{STEPS}; its training state is in {state}" in lines
    assert torch.load(state, weights_only=True)["step"] == 1 and is_complete(tmp_path / "iter_1" / "run_0")
    lines = []
    assert_same_weights(in_process(warp, cfg, None, lines.append), reference)
    assert "iter 1 run 2: resuming at step 1" in "\n".join(lines)


@pytest.mark.parametrize("main", [True, False])
def test_a_second_signal_stops_the_main_process_at_once_but_not_a_worker(main):
    script = ("import os, signal; from nanowarp.signals import stop_on_signals, stop_requested\n"
              f"with stop_on_signals(main={main}):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    print('still here, asked to stop by', stop_requested())\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if main:
        assert done.returncode == -signal.SIGINT and "still here" not in done.stdout, done.stderr
    else:
        assert done.returncode == 0 and f"still here, asked to stop by {int(signal.SIGINT)}" in done.stdout, done.stderr


# ---- one job per folder ---------------------------------------------------------------------

def test_a_second_job_on_the_folder_is_refused_naming_the_holder_and_a_sigkill_leaves_no_stale_lock(
        job_flags, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom nanowarp.jobs.folder import lock_out_dir\n"
                               "with lock_out_dir(sys.argv[1]): print('locked', flush=True); time.sleep(300)",
                               str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train.main(job_flags + ["--out_dir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path} is in use by another job (pid {holder.pid} on " in err and "another --out_dir" in err
        assert sorted(os.listdir(tmp_path)) == ["job.lock"]  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    with lock_out_dir(str(tmp_path)):  # the operating system released the lock of the killed process
        pass


# ---- a damaged job folder -------------------------------------------------------------------

def cut(path, n=100):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:-n])


@pytest.mark.parametrize("damaged, file", [
    ("iter_1/run_1", "model.safetensors"),
    ("iter_2/run_0", "metrics.jsonl"),
    ("iter_2/slerp", "model.safetensors"),
    ("iter_1/liti", "model.safetensors"),
])
def test_a_damaged_checkpoint_is_moved_aside_and_computed_again(job_flags, reference, reference_job, tmp_path,
                                                               capsys, damaged, file):
    out = tmp_path / "job"
    shutil.copytree(reference_job, out)
    cut(out / damaged / file, 30 if file == "metrics.jsonl" else 100)
    assert in_process(train.main, job_flags + ["--out_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"moved {out / damaged} aside to {out / damaged}.damaged: it will be computed again" in printed
    assert os.path.exists(f"{out / damaged}.damaged/{file}")
    assert_same_weights(load_file(out / damaged / "model.safetensors"),
                        load_file(os.path.join(reference_job, damaged, "model.safetensors")))
    assert_same_weights(final_weights(str(out)), reference)
    with open(out / "metrics.jsonl") as f, open(os.path.join(reference_job, "metrics.jsonl")) as g:
        assert [json.loads(r)["step"] for r in f] == [json.loads(r)["step"] for r in g]


def test_a_damaged_training_state_is_moved_aside_and_the_run_starts_over(job_flags, reference, reference_job,
                                                                        tmp_path, capsys):
    out = tmp_path / "job"
    shutil.copytree(reference_job, out)
    shutil.rmtree(out / "iter_2")
    os.makedirs(out / "iter_2" / "run_0")
    torch.save({"step": 2, "metrics": []}, out / "iter_2" / "run_0" / "state.pt")
    cut(out / "iter_2" / "run_0" / "state.pt")
    assert in_process(train.main, job_flags + ["--out_dir", str(out), "--save_every", "1"]) == 0
    printed = capsys.readouterr().out
    state = out / "iter_2" / "run_0" / "state.pt"
    assert f"damaged: cannot read {state}" in printed and "the run starts over" in printed
    assert os.path.exists(out / "iter_2" / "run_0" / "state.pt.damaged")
    assert_same_weights(final_weights(str(out)), reference)


def test_a_damaged_job_file_is_named_with_the_ways_out(job_flags, reference_job, tmp_path, capsys):
    out = tmp_path / "job"
    shutil.copytree(reference_job, out)
    cut(out / "job.json", 50)
    before = snapshot(out)
    assert train.main(job_flags + ["--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"train.py: error: {out / 'job.json'} is damaged (" in err
    assert "Restore it from a copy, add --fresh" in err and "or choose another --out_dir" in err
    assert snapshot(out) == before
    assert in_process(train.main, job_flags + ["--out_dir", str(out), "--fresh"]) == 0  # one of the ways out


# ---- eval.py cut short ----------------------------------------------------------------------

def test_eval_py_run_again_after_a_crash_continues_with_the_models_not_finished(
        tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir, policies, tmp_path, monkeypatch):
    def argv(out):
        return ["--models", tiny_gpt2_dir, *policies, "--sweep", tiny_gpt2_dir, policies[0], "--etas", "0.5", "1",
                "--ref", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--data", prepared_imdb_dir,
                "--n_prompts", "3", "--max_new_tokens", "8", "--device", "cpu", "--batch_size", "2", "--plot", "none",
                "--out", str(out)]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        eval_cli.main(argv(tmp_path / "uninterrupted.json"))
        evaluate, evaluated = eval_cli.evaluate, []

        def crash_on_the_third_model(policy, *args, **kwargs):
            if len(evaluated) == 2:
                raise RuntimeError("crash")
            evaluated.append(policy)
            return evaluate(policy, *args, **kwargs)

        monkeypatch.setattr(eval_cli, "evaluate", crash_on_the_third_model)
        with pytest.raises(RuntimeError, match="crash"):
            eval_cli.main(argv(tmp_path / "results.json"))
        assert len(json.loads((tmp_path / "results.json").read_text())) == 2
        evaluated.clear()
        monkeypatch.setattr(eval_cli, "evaluate", lambda policy, *a, **k: evaluated.append(policy) or evaluate(
            policy, *a, **k))
        eval_cli.main(argv(tmp_path / "results.json"))
    finally:
        torch.set_num_threads(threads)
    assert len(evaluated) == 1  # only the third model (and the sweep, through liti_sweep)
    assert json.loads((tmp_path / "results.json").read_text()) == \
        json.loads((tmp_path / "uninterrupted.json").read_text())
    assert not (tmp_path / "results.json.partial").exists()
