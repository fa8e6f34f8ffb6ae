"""The package's layout shows its architecture: the library (nanowarp/*.py) never imports the laptop
study (nanowarp/study/), no module imports itself through others (imports inside functions
included), so each can be read, and loaded, after the ones it builds on, and no source file is
longer than a reader takes in at once."""

import ast
import os

import nanowarp

PACKAGE = os.path.dirname(nanowarp.__file__)
ROOT = os.path.dirname(PACKAGE)
MAX_LINES = 400


def module_name(path):
    """'gpt2' for nanowarp/models/gpt2.py, 'study.tiny' for nanowarp/study/tiny.py, 'study' for its __init__."""
    rel = os.path.relpath(path, PACKAGE)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def imported_modules(path):
    """The nanowarp modules a source file imports, anywhere in it, named as module_name names them."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "nanowarp":
            base = node.module[len("nanowarp."):] if node.module != "nanowarp" else ""
            for alias in node.names:  # `from nanowarp.study import tiny` imports a module; `from nanowarp.models.gpt2 import GPT2` a name
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(sub if os.path.exists(os.path.join(PACKAGE, *sub.split(".")) + ".py") else base)
        elif isinstance(node, ast.Import):
            found |= {alias.name[len("nanowarp."):] for alias in node.names if alias.name.startswith("nanowarp.")}
    return found - {""}


def sources(folder, skip=(".venv", ".git", "runs")):
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.startswith(".")]
        yield from (os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))


def import_graph():
    graph = {}
    for path in sources(PACKAGE):
        name = module_name(path)
        graph[name] = imported_modules(path) - {name}
    return graph


def find_cycle(graph):
    """One cycle of module names (first == last), or None."""
    state = {}  # module -> "open" while its imports are followed, "done" after

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def library_imports_of_the_study(graph):
    """(library module, study module) for every import that goes the wrong way."""
    return sorted((m, dep) for m, deps in graph.items() if not m.startswith("study")
                  for dep in deps if dep == "study" or dep.startswith("study."))


def test_no_module_of_the_package_imports_itself_through_others():
    graph = import_graph()
    assert {"warp", "jobs.job", "jobs.folder", "jobs.parallel", "rl", "models", "models.gpt2", "study.tiny",
            "study.report", "study.evaluation"} <= set(graph)
    assert "models.gpt2" in graph["study.tiny"] and "study.tiny" in graph["study.evaluation"]  # both kinds of import seen
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_library_never_imports_the_study():
    assert library_imports_of_the_study(import_graph()) == []


# the modules of the algorithm, which a learner reads (README, "Reading path"), and the one door they
# have into the job machinery (nanowarp/jobs/): warp() opens the job through jobs/job.py's open_job
ALGORITHM = ("warp", "rl", "sampling", "logprobs", "merging", "lora", "reward")


def machinery_imports(graph, modules=ALGORITHM):
    """{module: the modules of nanowarp/jobs/ it imports} for the algorithm's modules."""
    return {m: sorted(d for d in graph[m] if d == "jobs" or d.startswith("jobs.")) for m in modules}


def test_the_algorithm_reaches_the_job_machinery_only_through_warps_job():
    assert machinery_imports(import_graph()) == {**{m: [] for m in ALGORITHM}, "warp": ["jobs.job"]}


def function_lines(path, name):
    """The number of lines of the top-level function `name` in a source file, its decorators excluded."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return node.end_lineno - node.lineno + 1


def test_rl_step_is_the_inner_step_in_at_most_60_lines():
    assert function_lines(os.path.join(PACKAGE, "rl.py"), "rl_step") <= 60


def test_the_checks_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert library_imports_of_the_study({"gpt2": {"study.tiny"}, "study.tiny": {"gpt2"}}) == [("gpt2", "study.tiny")]
    assert machinery_imports({"rl": {"jobs.parallel", "lora"}}, ["rl"]) == {"rl": ["jobs.parallel"]}
    assert function_lines(__file__, "function_lines") == 5


def test_no_source_file_is_longer_than_400_lines():
    long = {os.path.relpath(p, ROOT): n for p in sources(ROOT)
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > MAX_LINES}
    assert long == {}, f"split these files (> {MAX_LINES} lines): {long}"
