"""Crash safety of a WARP job: a job killed with SIGKILL anywhere resumes to the weights of an
uninterrupted job, a resume with other settings is refused, a NaN stops the job with a message."""

import json
import os

import pytest
import torch

import train
from conftest import (ITERATIONS, RUNS, STEPS, Killed, assert_same_weights, final_weights, in_process, leftovers,
                      stop_at, train_py)
from nanowarp.config import parse_args
from nanowarp.jobs.folder import is_complete, start_job
from nanowarp.reward import Reward
from nanowarp.warp import warp

# Each attempt kills itself (NANOWARP_KILL_AT, a real SIGKILL) at the next point; the next attempt,
# the same command, resumes.
KILLS = [
    "iter_1/run_0/saved",  # between two runs
    "iter_1/run_1/step_2",  # inside a run: it starts over
    "iter_2/merge",  # between the SLERP and the LITI checkpoints
]


def test_a_job_killed_anywhere_resumes_to_the_weights_of_an_uninterrupted_job(job_flags, reference, tmp_path, capsys):
    flags = job_flags + ["--out_dir", str(tmp_path)]
    for point in KILLS:
        attempt = train_py(flags, env={"NANOWARP_KILL_AT": point})
        assert attempt.returncode == -9, f"not killed at {point}:\n{attempt.stdout}\n{attempt.stderr}"
    assert in_process(train.main, flags) == 0  # the same command, run here to spare a process start
    printed = capsys.readouterr().out
    assert "resuming the job" in printed and "iter 1: done earlier" in printed
    assert_same_weights(final_weights(str(tmp_path)), reference)
    assert leftovers(str(tmp_path)) == []
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    steps = sorted((r["iteration"], r["run"], r["step"]) for r in rows)
    assert steps == [(i, m, t) for i in range(1, ITERATIONS + 1) for m in range(RUNS) for t in range(1, STEPS + 1)]


def test_a_run_resumes_inside_from_the_state_saved_by_save_every(job_flags, reference, tmp_path, monkeypatch):
    stop_at(monkeypatch, "iter_1/run_1/step_3")
    cfg = parse_args(job_flags + ["--out_dir", str(tmp_path), "--save_every", "2"])
    with pytest.raises(Killed):
        in_process(warp, cfg, None, lambda *a: None)
    assert torch.load(tmp_path / "iter_1" / "run_1" / "state.pt", weights_only=True)["step"] == 2
    lines = []
    theta = in_process(warp, cfg, None, lines.append)
    assert "iter 1 run 2: resuming at step 2" in "\n".join(lines)
    assert_same_weights(theta, reference)
    assert leftovers(str(tmp_path)) == []
    with open(tmp_path / "iter_1" / "run_1" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))


def test_a_bf16_job_resumes_inside_a_run_to_the_weights_of_an_uninterrupted_one(job_flags, tmp_path, monkeypatch):
    # bf16 keeps the anchor's float32 EMA master in the training state; LoRA dropout draws from the saved stream
    flags = job_flags + ["--dtype", "bfloat16", "--lora_dropout", "0.1", "--gradient_checkpointing"]
    whole = in_process(warp, parse_args(flags + ["--out_dir", str(tmp_path / "whole")]), None, lambda *a: None)
    stop_at(monkeypatch, "iter_1/run_1/step_3")
    cfg = parse_args(flags + ["--out_dir", str(tmp_path / "stopped"), "--save_every", "2"])
    with pytest.raises(Killed):
        in_process(warp, cfg, None, lambda *a: None)
    lines = []
    assert_same_weights(in_process(warp, cfg, None, lines.append), whole)
    assert "iter 1 run 2: resuming at step 2" in "\n".join(lines)


def test_a_resume_with_other_settings_is_refused_naming_the_flags(job_flags, tmp_path, capsys):
    flags = job_flags + ["--out_dir", str(tmp_path)]
    start_job(parse_args(flags), log=lambda *a: None)
    rc = train.main(flags + ["--lr", "0.5", "--kl_coef", "0.2"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--kl_coef 0.1 (now 0.2), --lr 0.01 (now 0.5)" in err and "--fresh" in err
    # flags that do not change the result may change
    start_job(parse_args(flags + ["--workers", "2", "--threads", "2", "--log_every", "5", "--save_every", "2",
                                  "--iterations", "3"]), log=lambda *a: None)


def test_fresh_deletes_the_earlier_results_and_starts_over(job_flags, tmp_path):
    flags = job_flags + ["--out_dir", str(tmp_path)]
    start_job(parse_args(flags), log=lambda *a: None)
    os.makedirs(tmp_path / "iter_1" / "run_0")
    (tmp_path / "notes.txt").write_text("not ours")
    start_job(parse_args(flags + ["--lr", "0.5", "--fresh"]), log=lambda *a: None)
    assert not (tmp_path / "iter_1").exists() and (tmp_path / "notes.txt").exists()
    assert json.loads((tmp_path / "job.json").read_text())["lr"] == 0.5


def test_results_without_a_job_file_are_not_resumed(job_flags, tmp_path, capsys):
    os.makedirs(tmp_path / "iter_1" / "run_0")
    assert train.main(job_flags + ["--out_dir", str(tmp_path)]) == 2
    assert "no job.json" in capsys.readouterr().err


def test_a_nan_reward_stops_the_job_naming_it_and_its_step_and_keeps_the_finished_runs(
        job_flags, tmp_path, monkeypatch, capsys):
    score, calls = Reward.score, []

    def nan_in_run_1_step_2(self, texts, finished=None, columns=None):  # one call per step
        calls.append(None)
        rewards, parts = score(self, texts, finished, columns)
        return (torch.full_like(rewards, float("nan")) if len(calls) == STEPS + 2 else rewards), parts

    monkeypatch.setattr(Reward, "score", nan_in_run_1_step_2)
    rc = in_process(train.main, job_flags + ["--out_dir", str(tmp_path)])
    assert rc == 2
    assert "iter_1/run_1: non-finite reward at step 2" in capsys.readouterr().err
    assert is_complete(tmp_path / "iter_1" / "run_0")
    assert not is_complete(tmp_path / "iter_1" / "run_1") and not (tmp_path / "iter_1" / "liti").exists()
