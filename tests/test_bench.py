"""The benchmark scripts run end to end on tiny shapes and print their tables (the numbers
themselves are measured by hand, not by the test suite)."""

import contextlib
import importlib.util
import io
import json
import os
import re
import runpy
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run(capsys, monkeypatch):
    """run(script, *flags): what `python bench/script flags` prints, the script run as __main__ in
    this process (a process start spared; the processes it starts itself are started as usual)."""
    def run_script(script, *flags):
        path = os.path.join(ROOT, "bench", script)
        monkeypatch.setattr(sys, "argv", [path, *flags])
        monkeypatch.setattr(sys, "path", list(sys.path))  # the scripts add their folders to it
        threads, rng = torch.get_num_threads(), torch.get_rng_state()
        try:
            runpy.run_path(path, run_name="__main__")
        finally:  # what the scripts set for themselves
            torch.set_num_threads(threads)
            torch.set_rng_state(rng)
        return capsys.readouterr().out
    return run_script


@pytest.fixture
def workers_here(monkeypatch):
    """The memory benchmarks' workers (fresh_process.run_worker) run in this process: what is tested is
    their tables, not their numbers, and a process start costs seconds (test_a_worker_runs_in_a_process_of_its_own)."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    import fresh_process

    def run_worker_here(script, flags):
        printed = io.StringIO()
        with monkeypatch.context() as patch, contextlib.redirect_stdout(printed):
            patch.setattr(sys, "argv", [script, *map(str, flags)])
            runpy.run_path(script, run_name="__main__")
        return json.loads(printed.getvalue().strip().splitlines()[-1])
    monkeypatch.setattr(fresh_process, "run_worker", run_worker_here)


def test_a_worker_runs_in_a_process_of_its_own(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "bench"))
    from fresh_process import run_worker
    script = tmp_path / "worker.py"
    script.write_text("import json, os, sys\nprint('a table first')\n"
                      "print(json.dumps(dict(pid=os.getpid(), flags=sys.argv[1:])))\nsys.exit(3 if '--fail' in sys.argv else 0)\n")
    result = run_worker(str(script), ["--n", 2])
    assert result == dict(pid=result["pid"], flags=["--n", "2"]) and result["pid"] != os.getpid()
    with pytest.raises(SystemExit, match="worker.py --fail failed"):
        run_worker(str(script), ["--fail"])


def test_sampling_bench_prints_rates_ratios_and_the_matmul_bound(run):
    out = run("sampling.py", "--layers", "2", "--smoke", "--shapes", "4x3", "--prompt-len", "4", "--repeats", "1",
              "--threads", "1", "--profile", "--lora-ranks", "2", "--lora-unfolded")
    for contender in ("nanowarp", "nanowarp LoRA 2", "LoRA 2 unfolded", "generate", "no cache"):
        assert re.search(rf"4 x 3 +{contender} +[\d.]+ +[\d.]+x +[\d.]+x +1\n", out), (contender, out)
    assert re.search(r"4 x 3 +nanowarp +[\d.]+ +[\d.]+x +1\.00x", out)
    assert re.search(r"matmuls alone, 4x3: .* at most [\d.]+ tokens/s", out)
    assert re.search(r"nanowarp's median, 4x3: [\d.]+ tokens/s = [\d.]+% of that bound", out)
    assert re.search(r"so at most [\d.]+x generate's median at 4x3", out)


def test_sampling_bench_runs_a_llama_of_smollm2s_shape(run):
    out = run("sampling.py", "--model", "smollm2", "--layers", "2", "--smoke", "--shapes", "4x3", "--prompt-len", "4",
              "--repeats", "1", "--threads", "1", "--no-cache-repeats", "0", "--lora-ranks", "2", "--profile")
    assert "--model smollm2 (2 layers)" in out.splitlines()[0]
    for contender in ("nanowarp", "nanowarp LoRA 2", "generate"):
        assert re.search(rf"4 x 3 +{contender} +[\d.]+ +[\d.]+x +[\d.]+x +1\n", out), (contender, out)
    assert re.search(r"matmuls alone, 4x3: .* at most [\d.]+ tokens/s", out)


def test_bench_policies_match_transformers_and_the_parity_check_sees_the_rope():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from policies import hf_model, parity, policy_config
    finally:
        sys.path.pop(0)
    from nanowarp.models import from_config
    config = policy_config("smollm2", vocab_size=300, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2)
    assert (config.rope_theta, config.rms_norm_eps, config.tie_word_embeddings) == (100000.0, 1e-5, True)
    model = from_config(config).eval()
    with torch.no_grad():  # not all norms 1, so that a wrong eps or norm would show too
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf = hf_model(model.hf_state_dict(), config).eval()
    parity(hf, model)
    config.rope_theta = 10000.0  # SmolLM2's is 100,000: transformers' copy no longer agrees
    with pytest.raises(AssertionError):
        parity(hf, from_config(config).load_hf_state_dict(model.hf_state_dict()).eval())


def test_logprobs_bench_prints_time_and_memory_for_both_cases(run, workers_here):
    out = run("logprobs.py", "--batch", "2", "--seq", "5", "--vocab", "300", "--dim", "16", "--repeats", "1",
              "--threads", "1")
    for case in ("hidden", "hidden+weight"):
        for variant in ("naive", "fused"):
            assert re.search(rf"\n{re.escape(case)} +{variant} +[\d.]+ +-?[\d.]+ +[\d.]+x +(-?[\d.]+%|n/a)", out), (case, variant, out)


def test_device_check_prints_its_table_on_small_shapes(run):
    out = run("device_check.py", "--small", "--no-compile", "--rl-steps", "2", "--threads", "1")
    table = out[out.index("\ncheck "):]
    for dtype in ("float32", "bfloat16"):
        assert re.search(rf"parity +{dtype}: max \|Δ log-prob\| vs CPU float32 +\d\.\d\de[-+]\d\d", table)
        for who in ("nanowarp eager", "generate"):
            assert re.search(rf"sampling +{dtype}: {who}, 8 x 16 +\d+ tok/s", table), (who, table)
        for who in ("naive", "fused"):
            assert re.search(rf"log-prob +{dtype}: {who}, 8 x 24, fwd\+bwd +[\d.]+ ms +[\d.]+x naive", table)
        for method in ("REINFORCE", "RLOO k=4"):
            assert re.search(rf"RL step +{dtype}: {method}, batch 8, 16 new, LoRA 4 +[\d.]+ s +sample [\d.]+, "
                             rf"score [\d.]+, update [\d.]+", table), (method, table)
            assert re.search(rf"job +{dtype}: {method}, I=2 M=2 T=100 projected +[\d.]+ min", table)
    assert re.search(r"parity +float32: .* 0\.00e\+00", table)  # the CPU against itself


def test_device_check_measures_the_cpu_memory_of_an_rl_step(run, workers_here):
    out = run("device_check.py", "--small", "--cpu-memory", "--micro-batch-size", "4", "--threads", "1")
    assert re.search(r"whole batch +\d+ +\d+ +-?\d+\n +4 +\d+ +\d+ +-?\d+\n", out), out
    assert re.search(r"micro-batches of 4: ([\d.]+x|n/a) the whole batch's peak, (-?[\d.]+x|n/a) its step's extra peak", out)


def test_scale_bench_prints_load_and_step_memory_next_to_the_targets(run, workers_here):
    out = run("scale.py", "--tiny", "--threads", "1")
    assert re.search(r"tiny: 2 layers, [\d.]+M weights, a float32 file of \d+ MiB", out), out
    assert re.search(r"\ncopying load +[\d.]+ +1\.00x +-?\d+ +-?[\d.]+x +\n", out), out
    for loader, target in (("from_pretrained", "1.2"), ("from_pretrained bf16", "1.0")):
        assert re.search(rf"\n{loader} +[\d.]+ +[\d.]+x +-?\d+ +-?[\d.]+x +≤ {target}x file, ≤ 1\.5x copying's time",
                         out), (loader, out)
    for loader in ("checksums alone", "unverified"):
        assert re.search(rf"\n{loader} +[\d.]+ +[\d.]+x +-?\d+ +-?[\d.]+x +\n", out), (loader, out)
    assert re.search(r"\nfloat32 +[\d.]+ +-?\d+ +(1\.00x|n/a)\n", out), out
    assert re.search(r"\nbfloat16 +[\d.]+ +-?\d+ +(-?[\d.]+x|n/a) +target ≤ 0\.60x\n", out), out
    assert re.search(r"\nbfloat16 \+ checkpointing +[\d.]+ +-?\d+ +(-?[\d.]+x|n/a)", out), out


def test_rl_step_bench_prints_phases_and_ratios_without_trl(run):
    out = run("rl_step.py", "--shapes", "smoke", "--contenders", "nanowarp,reference", "--repeats", "1",
              "--threads", "1", "--profile")
    table = out[out.index("\nmedians over 1 rounds"):]
    assert re.search(r"smoke \(8 x 6 tokens\) +nanowarp +[\d.]+ +1\.00x( +[\d.]+){6}\n", table), out
    if importlib.util.find_spec("peft"):  # the reference way's LoRA is peft's
        assert re.search(r"smoke \(8 x 6 tokens\) +reference +[\d.]+ +[\d.]+x( +[\d.]+){6}\n", table), out
    else:
        assert "reference: skipped, peft not installed" in out
    assert "Differences that cannot be aligned" in table
    assert re.search(r"update.s matmuls alone .*: [\d.]+ s \(\d+ GFLOP/s\)", out)
    assert re.search(r"so the update is at \d+% of its matmul floor", out)


def test_checksums_bench_prints_save_load_verify_and_the_share_of_a_run(run):
    out = run("checksums.py", "--layers", "1", "--width", "32", "--vocab", "100", "--repeats", "1")
    for contender in ("save", "load"):
        assert re.search(rf"\n{contender} +[\d.]+ *\n", out), (contender, out)
    assert re.search(r"\nsave \+ checksums +[\d.]+ +[\d.]+x\n", out) and re.search(r"\nload \+ verify +[\d.]+ +[\d.]+x", out)
    assert re.search(r"checksums alone +[\d.]+ +\([\d.]+ GB/s, hub.seal\)", out)
    assert re.search(r"verify alone +[\d.]+ +\([\d.]+ GB/s\)", out)
    assert re.search(r"per WARP iteration of 2 runs \(4 checkpoints sealed, 3 verified\): [\d.]+ s = [\d.]+% of "
                     r"2 x 100 steps x 7.15 s \(1430 s\)", out)


def test_rl_step_bench_runs_a_llama_policy(run):
    contenders = "nanowarp,reference,trl" if importlib.util.find_spec("trl") else "nanowarp,reference"
    out = run("rl_step.py", "--model", "smollm2", "--shapes", "smoke", "--contenders", contenders, "--repeats", "1",
              "--threads", "1")
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in out
    table = out[out.index("\nmedians over 1 rounds"):]
    assert re.search(r"smoke \(8 x 6 tokens\) +nanowarp +[\d.]+ +1\.00x( +[\d.]+){6}\n", table), out
    for name in contenders.split(",")[1:] if importlib.util.find_spec("peft") else ():
        assert re.search(rf"smoke \(8 x 6 tokens\) +{name} +[\d.]+ +[\d.]+x( +[\d.]+){{6}}\n", table), (name, out)


def test_families_bf16_bench_prints_small_differences(run):
    out = run("families_bf16.py", "--families", "gemma2")
    row = re.search(r"\ngemma2 +([\d.]+) +([\d.]+) +([\d.]+)\n", out)
    assert row, out
    assert all(0 < float(d) < 0.1 for d in row.groups()), out  # bf16 rounding: a few hundredths, not more


def test_mutation_bench_configures_one_module_and_refuses_unknown_ones():
    # the mutation run itself takes minutes a module (docs/testing.md): here its set-up only
    spec = importlib.util.spec_from_file_location("mutation", os.path.join(ROOT, "bench", "mutation.py"))
    mutation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mutation)
    for module, (tests, keyword) in mutation.MODULES.items():
        path = "nanowarp/" + module.replace(".", "/") + ".py"  # fast.logprobs: nanowarp/fast/logprobs.py
        assert os.path.isfile(os.path.join(ROOT, path)), module
        assert all(os.path.isfile(os.path.join(ROOT, t)) for t in tests), (module, tests)
        config = mutation.mutmut_config(module, tests, keyword).splitlines()
        assert config[1] == "[tool.mutmut]" and f'only_mutate = ["{path}"]' in config
        assert "pytest_add_cli_args_test_selection = [" + ", ".join(f'"{t}"' for t in tests) + "]" in config
    with pytest.raises(SystemExit):
        mutation.main(["nanowarp_no_such_module"])
