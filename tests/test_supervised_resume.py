"""The supervised stages (train.py --stage reward / sft, the reproduction's judge) stop at the end of
a step on SIGINT / SIGTERM, save their training state with --save_every N, and a rerun continues to
the weights of a run never stopped, bit for bit; on the tiny fixture models and data."""

import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

import nanowarp.supervised as supervised
import train
from conftest import Killed, assert_same_weights, gpt2_classifier, in_process
from nanowarp.config import Config
from nanowarp.signals import Interrupted, stop_on_signals


def signal_at(monkeypatch, point, signum=signal.SIGINT):
    """A real signal to this process when the stage reaches the kill point `point` (supervised.kill_point)."""
    monkeypatch.setattr(supervised, "kill_point", lambda name: name == point and os.kill(os.getpid(), signum))


def sft_flags(tiny_gpt2_dir, prepared_imdb_dir, out):
    return ["--stage", "sft", "--policy", tiny_gpt2_dir, "--data", str(prepared_imdb_dir), "--out_dir", str(out),
            "--epochs", "2", "--train_batch_size", "4", "--train_lr", "1e-2", "--lora_rank", "2", "--lora_dropout", "0.1",
            "--max_length", "24", "--test_limit", "2", "--device", "cpu", "--threads", "1", "--seed", "3"]


def test_a_sigterm_stops_the_sft_stage_with_143_and_a_rerun_continues_to_the_same_weights(
        tiny_gpt2_dir, prepared_imdb_dir, tmp_path, monkeypatch, capsys):
    assert in_process(train.main, sft_flags(tiny_gpt2_dir, prepared_imdb_dir, tmp_path / "once")) == 0
    reference = load_file(tmp_path / "once" / "sft" / "model.safetensors")
    flags = sft_flags(tiny_gpt2_dir, prepared_imdb_dir, tmp_path / "twice") + ["--save_every", "100"]
    with monkeypatch.context() as patch:
        signal_at(patch, "sft/step_2", signal.SIGTERM)
        assert in_process(train.main, flags) == 143
    out = capsys.readouterr()
    state = tmp_path / "twice" / "sft" / "state.pt"
    assert f"sft: stopped after step 2/6; its training state is in {state}" in out.out
    assert "train.py: stopped by SIGTERM: its training state is saved, run the same command again" in out.err
    assert not (tmp_path / "twice" / "sft" / "config.json").exists()
    other = flags[:flags.index("--train_lr") + 1] + ["1e-3"] + flags[flags.index("--train_lr") + 2:]
    assert in_process(train.main, other) == 2  # another run's state is not continued
    assert f"{state} holds the training state of a sft run with other settings: lr 0.01 (now 0.001)" in \
        capsys.readouterr().err
    assert in_process(train.main, flags) == 0
    assert "sft: resuming at step 2" in capsys.readouterr().out
    assert_same_weights(load_file(tmp_path / "twice" / "sft" / "model.safetensors"), reference)
    assert sorted(n for n in os.listdir(tmp_path / "twice" / "sft") if n.startswith("state")) == []


@pytest.mark.parametrize("name", ["reward_model", "judge"])
def test_a_stopped_or_killed_reward_stage_continues_to_the_same_weights(
        name, tiny_reward_dir, bpe_dir, prepared_imdb_dir, tmp_path, monkeypatch):
    """The reward model (DistilBERT, with dropout) as train.py trains it, and a GPT-2 classifier as the
    reproduction's judge stage does (train_reward_model(..., name="judge"))."""
    def run(out):
        cfg = Config(data=prepared_imdb_dir, out_dir=str(out), reward_base=tiny_reward_dir, epochs=2.0,
                     train_batch_size=4, train_lr=3e-3, max_length=32, test_limit=2, save_every=2, log_every=100)
        torch.manual_seed(0)
        judge = dict(model=gpt2_classifier(bpe_dir), tokenizer_folder=bpe_dir) if name == "judge" else {}
        return supervised.train_reward_model(cfg, torch.device("cpu"), lines.append, **judge, name=name)

    lines = []
    run(tmp_path / "once")
    reference = load_file(tmp_path / "once" / name / "model.safetensors")
    with monkeypatch.context() as patch, stop_on_signals(), pytest.raises(Interrupted) as stopped:
        signal_at(patch, f"{name}/step_1")  # a SIGINT: the state of step 1 is saved as it stops
        run(tmp_path / "twice")
    assert (stopped.value.exit_code, stopped.value.step) == (130, 1)

    def killed(point):
        if point == f"{name}/step_4":
            raise Killed(point)  # where NANOWARP_KILL_AT would SIGKILL it: the state of step 2 is on disk
    with monkeypatch.context() as patch, pytest.raises(Killed):
        patch.setattr(supervised, "kill_point", killed)
        run(tmp_path / "twice")
    assert torch.load(tmp_path / "twice" / name / "state.pt", weights_only=True)["step"] == 2
    run(tmp_path / "twice")
    assert [line.split(" from ")[0] for line in lines if "resuming" in line] == \
        [f"{name.replace('_', ' ')}: resuming at step {t}" for t in (1, 2)]
    assert_same_weights(load_file(tmp_path / "twice" / name / "model.safetensors"), reference)
    assert not (tmp_path / "twice" / name / "state.pt").exists()


def test_a_damaged_training_state_is_moved_aside_and_the_stage_starts_over(tiny_reward_dir, prepared_imdb_dir,
                                                                          tmp_path):
    cfg = Config(data=prepared_imdb_dir, out_dir=str(tmp_path), reward_base=tiny_reward_dir, epochs=1.0,
                 train_batch_size=4, train_lr=3e-3, max_length=32, test_limit=2, save_every=1, log_every=100)
    state = tmp_path / "reward_model" / "state.pt"
    for content in (b"cut short", None):  # unreadable; readable, but not a state of this stage
        os.makedirs(state.parent, exist_ok=True)
        if content is None:
            torch.save({"step": 2}, state)
        else:
            state.write_bytes(content)
        lines = []
        supervised.train_reward_model(cfg, torch.device("cpu"), lines.append)
        assert any("reward model: damaged: " in line and f"moved aside to {state}.damaged" in line and
                   "the stage starts over" in line for line in lines), lines
        assert not state.exists() and not any("resuming" in line for line in lines)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_reproduce_py_stops_a_stage_at_a_step_end_and_exits_with_128_plus_the_signal(signum, capsys):
    import reproduce
    from nanowarp.signals import check_stop

    def stage():  # a step that gets the signal, then the check at its end
        os.kill(os.getpid(), signum)
        check_stop(step=1)
    with pytest.raises(SystemExit) as e:
        reproduce.stoppable("the judge", stage)
    assert e.value.code == 128 + signum
    assert f"reproduce.py: stopped by {signal.Signals(signum).name}: run the same command again to resume the judge" \
        in capsys.readouterr().err


def quick_stage(ready):
    """Done as soon as the slow stage runs in the other process (so each stage has its own)."""
    (ready / "quick").touch()
    for _ in range(3000):  # a minute at most: never a hang
        if (ready / "slow").exists():
            break
        time.sleep(0.02)
    (ready / "quick_done").touch()
    return 2


def slow_stage(ready):
    """Steps of 20 ms, each checking for a stop at its end, for at most a minute."""
    from nanowarp.signals import check_stop
    (ready / "slow").touch()
    for step in range(3000):
        time.sleep(0.02)
        check_stop(step=step + 1)
    return "not stopped"


def test_side_by_side_stages_stop_at_a_step_end_on_a_signal_to_reproduce_py_alone(tmp_path):
    from nanowarp.study.stages import Stages
    ready = tmp_path / "ready"
    ready.mkdir()

    def signal_when_quick_is_done():  # SIGTERM to this process alone, as `kill` or a scheduler sends it
        while not (ready / "quick_done").exists():
            time.sleep(0.02)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=signal_when_quick_is_done, daemon=True).start()
    stages = Stages(str(tmp_path))
    with stop_on_signals(), pytest.raises(Interrupted) as e:
        stages.side_by_side([("quick", str(ready), quick_stage, ready), ("slow", str(ready), slow_stage, ready)],
                            workers=2, threads=1)
    assert e.value.exit_code == 143 and e.value.step >= 1  # passed on, and the slow stage stopped at a step end
    assert stages.done["quick"]["result"] == 2 and "slow" not in stages.done  # what finished is kept
