"""The package's modules import each other without a cycle (imports inside functions included), so
each can be read, and loaded, after the ones it builds on."""

import ast
import os

import nanowarp

PACKAGE = os.path.dirname(nanowarp.__file__)


def imported_modules(path):
    """The nanowarp modules a source file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.ImportFrom) and node.module == "nanowarp":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanowarp."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("nanowarp.")}
    return found


def import_graph():
    return {name[:-3]: imported_modules(os.path.join(PACKAGE, name)) - {name[:-3]}
            for name in os.listdir(PACKAGE) if name.endswith(".py")}


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


def test_no_module_of_the_package_imports_itself_through_others():
    graph = import_graph()
    assert {"warp", "job", "runner", "parallel", "rl"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_a_cycle_is_found():  # the check above can fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
