"""
Mutation testing of WARP's core: how many deliberate mistakes the suite catches (docs/testing.md).

For each module, mutmut (the `dev` extra) makes mutants, copies of the code with one small mistake
each (a flipped sign or comparison, another constant, a dropped argument), and runs the fast test
files that exercise the module against each one; a mutant is killed when a test fails. The score
is killed / (killed + survived + not covered); a mutant that times out counts as killed.

    python bench/mutation.py                      every module of MODULES, one after the other
    python bench/mutation.py merging rl           some of them
    python bench/mutation.py rl --out runs/mut    survivors' diffs to runs/mut/rl.txt (default: mutation/)
    python bench/mutation.py fast.logprobs        a module of a subpackage: nanowarp/fast/logprobs.py

Each module runs in a fresh copy of the project (tracked and untracked, not ignored files) so that
its own test selection applies; it takes minutes per module on 2 cores (about a mutant a second).
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> the fast test files that pin it, and a -k expression that leaves out their slow tests (other
# processes, whole jobs: they run in the suite); mutmut runs, for each mutant, the selected tests that
# reach the mutated function
MODULES = {
    "merging": (["tests/test_merging.py", "tests/test_merge_cli.py"], None),
    "logprobs": (["tests/test_logprobs.py", "tests/test_objective.py"], None),
    "fast.logprobs": (["tests/test_logprobs.py", "tests/test_objective.py"], None),
    "sampling": (["tests/test_sampling.py", "tests/test_sampling_distribution.py", "tests/test_objective.py",
                  "tests/test_precision.py", "tests/test_lora.py"],
                 # of test_precision.py, the micro-batched and the bf16 sampler
                 "test_sampling or test_objective or test_lora or sampling_in_micro_batches or bf16_logprobs"),
    "fast.sampling": (["tests/test_sampling_distribution.py", "tests/test_sampling.py"], None),
    "lora": (["tests/test_lora.py", "tests/test_rl.py", "tests/test_objective.py"], None),
    "rl": (["tests/test_objective.py", "tests/test_rl.py", "tests/test_rl_wiring.py", "tests/test_prompt_datasets.py",
            "tests/test_scale.py", "tests/test_precision.py", "tests/test_eval.py"],
           # all of the first three; of the others, the fast tests of load_resources' prompts, the anchor,
           # micro-batches, bf16's master and decode (-k also matches a test's file name)
           "test_objective or test_rl or the_prompt_set_of_a_job or truncate_left_keeps or rl_models_are_built or "
           "anchor_shares or micro_batch or ema_anchor_needs or bf16_run_resumes or metrics_match_a_by_hand"),
    "reward": (["tests/test_rewards.py", "tests/test_reward_sources.py", "tests/test_serve_reward.py",
                "tests/test_objective.py"],
               "not workers and not torchrun and not stops_the_job and not dies and not example and not rises"),
    "optim": (["tests/test_optim.py"], None),
    "warp": (["tests/test_warp_loop.py"], None),  # test_train.py runs whole jobs: in the suite
}
# torch.compile cannot trace mutmut's trampolines: the compiled sampler's test runs in the suite only
DESELECT = ["tests/test_sampling.py::test_compiled_decoding_samples_what_eager_decoding_samples"]
STATUSES = ("killed", "timeout", "survived", "no tests", "suspicious", "skipped", "segfault")


def project_copy(dest):
    """The project's files (tracked, and untracked but not ignored) copied into dest."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    for f in files:
        if os.path.isfile(os.path.join(ROOT, f)):
            os.makedirs(os.path.dirname(os.path.join(dest, f)) or dest, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, f), os.path.join(dest, f))


def mutmut_config(module, tests, keyword=None):
    """The [tool.mutmut] table for one module, its test files, the deselected tests and the -k expression."""
    def toml_list(items):
        return "[" + ", ".join(f'"{i}"' for i in items) + "]"
    return (f"\n[tool.mutmut]\nsource_paths = [\"nanowarp\"]\nonly_mutate = [\"nanowarp/{module.replace('.', '/')}.py\"]\n"
            f"also_copy = {toml_list(['train.py', 'merge.py', 'eval.py', 'sample.py', 'serve_reward.py', 'bench', 'data', 'examples'])}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
            f"pytest_add_cli_args = {toml_list(['--deselect=' + d for d in DESELECT] + (['-k', keyword] if keyword else []))}\n"
            f"process_isolation = \"forkserver\"\n")


def run_module(module, out_dir):
    """mutmut on one module in a fresh copy; returns {status: count} and writes the survivors' diffs."""
    tests, keyword = MODULES[module]
    with tempfile.TemporaryDirectory(prefix=f"mutation-{module}-") as work:
        project_copy(work)
        with open(os.path.join(work, "pyproject.toml"), "a") as f:
            f.write(mutmut_config(module, tests, keyword))
        mutmut = [sys.executable, "-m", "mutmut"]
        run = subprocess.run(mutmut + ["run"], cwd=work, capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stdout + run.stderr).replace("\r", "\n").strip().splitlines()[-5:]
            raise SystemExit(f"mutmut failed on {module}:\n" + "\n".join(tail))
        results = subprocess.run(mutmut + ["results", "--all", "true"], cwd=work, capture_output=True, text=True,
                                 check=True).stdout
        rows = re.findall(r"^\s*(\S+): (.+)$", results, re.M)
        counts = {s: sum(1 for _, status in rows if status == s) for s in STATUSES}
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{module}.txt"), "w") as f:
            for name, status in rows:
                if status in ("survived", "no tests"):
                    diff = subprocess.run(mutmut + ["show", name], cwd=work, capture_output=True, text=True).stdout
                    lines = [l for l in diff.splitlines() if l[:1] in "+-" and l[:3] not in ("+++", "---")]
                    f.write(f"### {name} ({status})\n" + "\n".join(lines) + "\n")
    return counts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("modules", nargs="*", metavar="MODULE",
                   help=f"modules of nanowarp/ to mutate (default: all of {', '.join(MODULES)})")
    p.add_argument("--out", default="mutation", help="folder for each module's survivors and their diffs")
    args = p.parse_args(argv)
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        p.error(f"unknown module {unknown[0]!r}: choose from {', '.join(MODULES)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    print(f"{'module':<14} {'mutants':>7} {'killed':>7} {'timeout':>7} {'survived':>8} {'no tests':>8} {'score':>6}")
    for module in args.modules or list(MODULES):
        c = run_module(module, args.out)
        caught = c["killed"] + c["timeout"]
        total = caught + c["survived"] + c["no tests"] + c["suspicious"] + c["segfault"]
        print(f"{module:<14} {total:>7} {c['killed']:>7} {c['timeout']:>7} {c['survived']:>8} {c['no tests']:>8} "
              f"{caught / max(total, 1):>6.1%}", flush=True)


if __name__ == "__main__":
    main()
