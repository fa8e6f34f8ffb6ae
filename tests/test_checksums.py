"""checksums.sha256: every checkpoint folder nanowarp writes ends with one, in sha256sum's format; a
folder that has one is verified on load (a byte changed inside is named), one without loads as
before, and no crash leaves a folder whose checksums are wrong."""

import os
import shutil
import struct
import subprocess

import pytest
import torch

import eval as eval_cli
import merge
import sample as sample_cli
import train
from conftest import assert_same_weights, final_weights, in_process, perturbed_copy
from nanowarp import checksums, hub
from nanowarp.jobs.folder import read_state, write_state
from nanowarp.models import save_policy
from nanowarp.models.gpt2 import GPT2
from safetensors.torch import load_file


def flip_byte(path, where="data", offset=5):
    """Flip the bits of one byte of a safetensors file: in its tensor data, or in its JSON header."""
    with open(path, "r+b") as f:
        (header,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + header + offset if where == "data" else 8 + offset)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture
def policy(tiny_gpt2_dir, tmp_path):
    """A copy of the tiny GPT-2 with weights of its own, saved by nanowarp (tokenizer, card, checksums)."""
    return perturbed_copy(tiny_gpt2_dir, str(tmp_path / "policy"), 0)


def test_a_checkpoint_ends_with_checksums_of_its_files_that_sha256sum_checks(tiny_gpt2_dir, tmp_path, monkeypatch):
    written, atomic_write = [], hub.atomic_write
    monkeypatch.setattr(hub, "atomic_write", lambda path, *a, **k: written.append(os.path.basename(path))
                        or atomic_write(path, *a, **k))
    model = GPT2.from_pretrained(tiny_gpt2_dir)
    save_policy(str(tmp_path), model.hf_state_dict(), model.config, tiny_gpt2_dir, card="# a card\n")
    assert written[-2:] == ["config.json", "checksums.sha256"]  # after config.json, which marks it complete
    lines = (tmp_path / "checksums.sha256").read_text().splitlines()
    assert [line[66:] for line in lines] == sorted(n for n in os.listdir(tmp_path) if n != "checksums.sha256")
    assert all(line[64:66] == "  " for line in lines) and "README.md" in written
    if shutil.which("sha256sum"):
        done = subprocess.run(["sha256sum", "-c", "checksums.sha256"], cwd=tmp_path, capture_output=True, text=True)
        assert done.returncode == 0 and done.stdout.count(": OK") == len(lines), done.stdout + done.stderr


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_flipped_byte_is_named_and_a_folder_without_checksums_loads_as_before(policy, where):
    path = os.path.join(policy, "model.safetensors")
    flip_byte(path, where, offset=5 if where == "data" else 2)
    with pytest.raises(hub.CheckpointError, match=f"{path} is damaged: its bytes differ"):
        GPT2.from_pretrained(policy)
    with pytest.raises(hub.CheckpointError, match="model.safetensors is damaged"):
        hub.check_readable(policy)
    if where == "data":
        os.remove(os.path.join(policy, "checksums.sha256"))  # as a download from the Hub: not verified
        GPT2.from_pretrained(policy)


@pytest.mark.parametrize("damage, named", [
    ("garbage", "checksums.sha256 is damaged: line 1"),
    ("missing file", "merges.txt is missing"),
    ("changed tokenizer", "vocab.json is damaged"),
])
def test_every_listed_file_is_checked_and_a_damaged_checksums_file_is_named(policy, damage, named):
    if damage == "garbage":
        with open(os.path.join(policy, "checksums.sha256"), "wb") as f:
            f.write(b"0123 not a checksum\n")
    elif damage == "missing file":
        os.remove(os.path.join(policy, "merges.txt"))
    else:
        with open(os.path.join(policy, "vocab.json"), "a") as f:
            f.write(" ")
    with pytest.raises(hub.CheckpointError, match=named):
        hub.load_state_dict(policy)


@pytest.mark.parametrize("crash_in", ["write_json", "seal"])
def test_a_crash_while_a_checkpoint_is_rewritten_never_leaves_wrong_checksums(policy, monkeypatch, crash_in):
    model = GPT2.from_pretrained(policy)
    with torch.no_grad():
        model.transformer.wte.weight.add_(1)  # other weights, into the same folder

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(hub, crash_in, crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(policy)
    assert not os.path.exists(os.path.join(policy, "checksums.sha256"))  # unverified, not wrong
    assert checksums.problem(policy) is None
    monkeypatch.undo()
    GPT2.from_pretrained(policy).save_pretrained(policy)  # saved again: sealed again
    assert checksums.read(policy).keys() >= {"model.safetensors", "config.json", "vocab.json"}


def test_merge_sample_and_eval_name_the_damaged_file_and_exit_2(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir,
                                                                 policy, tmp_path, capsys):
    path = os.path.join(policy, "model.safetensors")
    flip_byte(path)
    commands = [
        (merge.main, ["--init", tiny_gpt2_dir, "--policies", policy, "--out", str(tmp_path / "merged")]),
        (sample_cli.main, ["--model", policy, "--prompt", "A film", "--device", "cpu"]),
        (eval_cli.main, ["--models", policy, "--ref", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--data",
                         prepared_imdb_dir, "--n_prompts", "1", "--max_new_tokens", "2", "--device", "cpu",
                         "--plot", "none", "--out", str(tmp_path / "r.json")]),
    ]
    for main, argv in commands:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{path} is damaged: its bytes differ" in err, err
    assert not (tmp_path / "merged").exists()


def test_merge_py_writes_checksums_into_an_existing_folder_last(tiny_gpt2_dir, policy, tmp_path):
    out = tmp_path / "merged"
    for eta in ("0.5", "1"):  # the second into the first's folder
        merge.main(["--init", tiny_gpt2_dir, "--policies", policy, "--out", str(out), "--eta", eta])
        assert checksums.problem(str(out)) is None and "model.safetensors" in checksums.read(str(out))


def test_a_job_moves_a_checkpoint_with_a_changed_byte_aside_and_computes_it_again(job_flags, reference, reference_job,
                                                                                 tmp_path, capsys):
    out = tmp_path / "job"
    shutil.copytree(reference_job, out)
    damaged = out / "iter_2" / "slerp"
    flip_byte(damaged / "model.safetensors")
    assert in_process(train.main, job_flags + ["--out_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"damaged: {damaged / 'model.safetensors'} is damaged: its bytes differ" in printed
    assert f"moved {damaged} aside to {damaged}.damaged: it will be computed again" in printed
    assert_same_weights(load_file(damaged / "model.safetensors"),
                        load_file(os.path.join(reference_job, "iter_2", "slerp", "model.safetensors")))
    assert_same_weights(final_weights(str(out)), reference)
    for name in ("iter_2/slerp", "iter_2/liti"):
        assert checksums.problem(str(out / name)) is None
    assert "metrics.jsonl" in checksums.read(str(out / "iter_1" / "run_0"))  # a run's rows are part of it


def test_a_training_state_carries_its_checksum_and_a_changed_byte_is_named(tmp_path):
    path = str(tmp_path / "state.pt")
    write_state({"step": 3, "w": torch.arange(1000.0)}, path)
    assert read_state(path)["step"] == 3 and checksums.read(str(tmp_path), "state.pt.sha256").keys() == {"state.pt"}
    with open(path, "r+b") as f:  # torch.load alone would not notice: the zip's CRCs are not checked
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(hub.CheckpointError, match=f"{path} is damaged: its bytes differ"):
        read_state(path)


def test_the_checksums_are_computed_beside_the_read_and_an_interrupt_waits_for_neither(policy, monkeypatch):
    """hub.load_state_dict hashes in a thread while it reads; what the hashing raises comes out; an
    interrupt during the read comes out at once, without waiting for the hashing to end."""
    import threading
    import time
    read_started, hashing, read = threading.Event(), checksums.problem, hub.read_safetensors
    monkeypatch.setattr(hub, "read_safetensors", lambda *a: read_started.set() or read(*a))
    monkeypatch.setattr(checksums, "problem", lambda folder: hashing(folder) if read_started.wait(10) else "hashed alone")
    assert set(hub.load_state_dict(policy)[0]) == set(load_file(os.path.join(policy, "model.safetensors")))

    def raising(error):
        def fail(*args):
            raise error
        return fail
    monkeypatch.setattr(checksums, "problem", raising(OSError("the disk is gone")))
    with pytest.raises(OSError, match="the disk is gone"):
        hub.load_state_dict(policy)

    never = threading.Event()
    monkeypatch.setattr(checksums, "problem", lambda folder: never.wait(30))
    monkeypatch.setattr(hub, "read_safetensors", raising(KeyboardInterrupt()))
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        hub.load_state_dict(policy)
    assert time.perf_counter() - start < 5
    never.set()
