"""The documentation holds: every relative link of README.md and docs/*.md leads to a file (and, for
#anchor, to a heading of it), every command quoted in them parses with its script's own flags (nothing
runs), every docs/*.md pointer in the code resolves, and the README's tree of the package is the
package."""

import argparse
import contextlib
import functools
import glob
import importlib.util
import io
import os
import re
import shlex
from unittest import mock

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
OPERATORS = {"&&", "||", ";", "|", "&"}
REDIRECTIONS = {">", ">>", "<", ">&", "&>"}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---- links ---------------------------------------------------------------------------------------

def slug(heading):
    """GitHub's anchor of a heading: links and tags to their text, lower case, punctuation dropped
    (but - and _), each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """The anchors of a markdown file's headings; a repeated one gets -1, -2, ... as on GitHub."""
    seen, out = {}, set()
    for match in re.finditer(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", read(path)), re.M):
        base = slug(match[1])
        out.add(f"{base}-{seen[base]}" if base in seen else base)
        seen[base] = seen.get(base, 0) + 1
    return out


def broken_link(source, target):
    """None when `target`, a link in file `source`, leads somewhere; else what is wrong."""
    if re.match(r"[a-z]+:", target):  # https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(os.path.dirname(source), path)) if path else source
    if not os.path.exists(full):
        return f"{target}: no such file"
    if anchor and full.endswith(".md") and anchor not in anchors(full):
        return f"{target}: no heading #{anchor} in {os.path.relpath(full, ROOT)}"
    return None


def broken_links(source):
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", read(source)))  # code is not a link
    return [problem for target in LINK.findall(text) if (problem := broken_link(source, target))]


# ---- commands ------------------------------------------------------------------------------------

def split_shell(line):
    """A shell line as its simple commands (lists of words): quotes and # comments as a shell reads
    them, split at && || ; | &, redirections dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    tokens = iter(lexer)
    for token in tokens:
        if token in OPERATORS:
            commands.append(words)
            words = []
        elif token in REDIRECTIONS:
            next(tokens, None)  # and its file
        else:
            words.append(token)
    return [c for c in commands + [words] if c]


def shell_lines(body, prompt):
    """The command lines of a code block: continuations joined, VAR="..." assignments substituted
    into the lines after them; with prompt, only the lines after a `$ ` prompt (a text block)."""
    variables, lines = {}, []
    for line in body.replace("\\\n", " ").splitlines():
        if prompt:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        assignment = re.fullmatch(r"\s*(\w+)=(\S.*)", line)
        if assignment and len(shlex.split(assignment[2], comments=True)) == 1:
            variables[assignment[1]] = shlex.split(assignment[2], comments=True)[0]
            continue
        for name, value in variables.items():
            line = re.sub(r"\$\{?%s\}?\b" % name, lambda _: value, line)
        lines.append(line)
    return lines


def quoted_commands(text):
    """Every shell command quoted in a markdown text, as a list of words: the lines of its bash blocks,
    the `$ ` lines of its text blocks, and its inline code that starts with python, torchrun or make."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in ("bash", "sh", "shell", "console", "text"):
            lines += shell_lines(body, prompt=lang in ("console", "text"))
    for span in re.findall(r"`([^`]+)`", FENCE.sub("", text)):
        span = " ".join(span.split())  # inline code may wrap
        if re.match(r"(python3?|torchrun|make) ", span):
            lines.append(span)
    return [words for line in lines for words in split_shell(line)]


@functools.lru_cache(maxsize=None)
def script_module(script):
    """The script (a path from the repository root) imported as a module: its own parse_args."""
    name = "docs_script_" + re.sub(r"\W", "_", script)
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_problem(script, argv, config_file):
    """None when the script's own parser takes argv, each flag spelt out (argparse would take a
    prefix), else its error. `...` stands for flags left out (so a required flag may be missing);
    --config's file is replaced by config_file (an empty one)."""
    if not os.path.isfile(os.path.join(ROOT, script)):
        return f"{script}: no such script"
    elided = "..." in argv
    argv = [a for a in argv if a != "..."]
    argv = [config_file if i and argv[i - 1] == "--config" else
            f"--config={config_file}" if a.startswith("--config=") else a for i, a in enumerate(argv)]
    module = script_module(script)
    if not hasattr(module, "parse_args"):
        return f"{script} has no parse_args(argv) to check the command against"
    err, parsers, parse = io.StringIO(), [], argparse.ArgumentParser.parse_args

    def recorded(parser, *args, **kwargs):  # the parser that reads the command line, for its flags
        parsers.append(parser)
        return parse(parser, *args, **kwargs)

    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
                mock.patch.object(argparse.ArgumentParser, "parse_args", recorded):
            module.parse_args(argv)
    except SystemExit as e:
        message = (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
        if e.code not in (0, None) and not (elided and "arguments are required" in message):
            return message
        return None
    flags = set(parsers[-1]._option_string_actions)
    abbreviated = [a.split("=")[0] for a in argv if a.startswith("--") and a.split("=")[0] not in flags]
    return f"not a flag of {script}, only a prefix of one: {' '.join(abbreviated)}" if abbreviated else None


@functools.lru_cache(maxsize=None)
def make_targets():
    """{target: (the script its recipe runs with $(ARGS), the arguments before them), or None} of the Makefile."""
    targets, text = {}, read(os.path.join(ROOT, "Makefile"))
    for name, recipe in re.findall(r"^([\w.-]+):[^=\n]*\n((?:\t.*\n?)*)", text, re.M):
        script = re.search(r"python (\S+\.py)((?: [^ $]\S*)*) \$\(ARGS\)", recipe)
        targets[name] = (script[1], shlex.split(script[2])) if script else None
    return targets


def command_problem(words, config_file):
    """None when a quoted command is sound (or not one of the project's), else what is wrong."""
    while words and re.fullmatch(r"\w+=.*", words[0]):  # CUDA_VISIBLE_DEVICES=0,1 python ...
        words = words[1:]
    if not words:
        return None
    if words[0] in ("python", "python3") and len(words) > 1 and not words[1].startswith("-"):  # not -m, -c
        return parse_problem(words[1], words[2:], config_file)
    if words[0] == "torchrun":
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if not scripts or any(not w.startswith("-") for w in words[1:scripts[0]]):
            return "torchrun: expected torchrun's --options, then a script"
        return parse_problem(words[scripts[0]], words[scripts[0] + 1:], config_file)
    if words[0] == "make":
        variables = dict(w.split("=", 1) for w in words[1:] if "=" in w)
        for target in [w for w in words[1:] if "=" not in w and not w.startswith("-")]:
            if target not in make_targets():
                return f"make {target}: no such target in the Makefile"
            if make_targets()[target] and "ARGS" in variables:
                script, fixed = make_targets()[target]
                if problem := parse_problem(script, fixed + shlex.split(variables["ARGS"]), config_file):
                    return problem
    return None


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "flags.json"
    path.write_text("{}")
    return str(path)


# ---- the documentation ---------------------------------------------------------------------------

@pytest.mark.parametrize("doc", DOC_FILES)
def test_every_relative_link_resolves(doc):
    assert broken_links(os.path.join(ROOT, doc)) == []


@pytest.mark.parametrize("doc", DOC_FILES)
def test_every_quoted_command_parses(doc, config_file):
    problems = [f"{' '.join(words)}\n    -> {problem}" for words in quoted_commands(read(os.path.join(ROOT, doc)))
                if (problem := command_problem(words, config_file))]
    assert problems == [], "\n".join(problems)


def test_the_docs_pages_are_there_and_linked_from_the_readme():
    pages = {os.path.basename(p) for p in DOC_FILES[1:]}
    assert {"reproduction.md", "performance.md", "robustness.md", "precision.md", "distributed.md"} <= pages
    linked = {os.path.basename(t.partition("#")[0]) for t in LINK.findall(read(os.path.join(ROOT, "README.md")))}
    assert pages <= linked, f"not linked from README.md: {sorted(pages - linked)}"


def python_files():
    """The project's Python files (this one aside: its examples point nowhere on purpose)."""
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__")) and d not in ("runs", "build")]
        yield from (os.path.join(dirpath, f) for f in filenames
                    if f.endswith(".py") and os.path.join(dirpath, f) != os.path.abspath(__file__))


def test_docs_pointers_in_the_code_resolve():
    pointers = [(path, target) for path in python_files()
                for target in re.findall(r"\bdocs/[\w.-]+\.md(?:#[\w-]+)?", read(path))]
    assert ("train.py", "docs/robustness.md#resuming-a-job") in [(os.path.relpath(p, ROOT), t) for p, t in pointers]
    problems = [f"{os.path.relpath(path, ROOT)}: {problem}" for path, target in pointers
                if (problem := broken_link(os.path.join(ROOT, "README.md"), target))]
    assert problems == []


def readme_tree():
    """The paths the README's tree of the package draws: 'nanowarp/models/gpt2.py', 'nanowarp/study/', ..."""
    block = next(body for lang, body in FENCE.findall(read(os.path.join(ROOT, "README.md")))
                 if lang == "text" and body.startswith("nanowarp/"))
    paths, stack = set(), []
    for line in block.splitlines():
        name = line.split()[0]
        stack = stack[:(len(line) - len(line.lstrip())) // 2] + [name.rstrip("/")]
        paths.add("/".join(stack) + "/" * name.endswith("/"))
    return paths


def test_the_readme_tree_is_the_package():
    package = os.path.join(ROOT, "nanowarp")
    actual = {"nanowarp/"}
    for dirpath, dirnames, filenames in os.walk(package):
        dirnames[:] = [d for d in dirnames if not d.startswith((".", "__"))]
        rel = os.path.relpath(dirpath, ROOT).replace(os.sep, "/")
        actual |= {f"{rel}/{d}/" for d in dirnames}
        actual |= {f"{rel}/{f}" for f in filenames if f.endswith(".py") and f != "__init__.py"}
    assert readme_tree() == actual


def reading_path(readme):
    """The files of the README's reading path, in its order (paths under nanowarp/), and the lines it says they hold."""
    section = readme.split("## Reading path", 1)[1].split("\n## ", 1)[0]
    total = int(re.search(r"([\d,]+) lines", section).group(1).replace(",", ""))
    return ["nanowarp/" + f for f in re.findall(r"`([\w/]+\.py)`", section)], total


def test_the_reading_path_is_all_of_warp_in_at_most_1500_lines():
    files, said = reading_path(read(os.path.join(ROOT, "README.md")))
    assert files[:2] == ["nanowarp/warp.py", "nanowarp/rl.py"] and len(files) == len(set(files)) >= 7
    lines = {f: sum(1 for _ in open(os.path.join(ROOT, f), encoding="utf-8")) for f in files}
    assert sum(lines.values()) == said <= 1500, lines
    for f in files:  # each opens with what it computes
        assert read(os.path.join(ROOT, f)).startswith('"""'), f


# ---- the checks can fail -------------------------------------------------------------------------

def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "b.md").write_text("# B\n\n## Flags: --dtype and `x`\n\n## Same\n\n## Same\n")
    (tmp_path / "a.md").write_text(
        "# A\n\n[ok](b.md#flags---dtype-and-x) [ok](b.md#same-1) ![ok](b.md) [web](https://example.org/x.md)\n"
        "[gone](c.md) [no heading](b.md#flags) [here](#a) [not here](#b)\n"
        "`[code](d.md)`\n```bash\n[code](e.md)\n```\n")
    assert broken_links(str(tmp_path / "a.md")) == [
        "c.md: no such file", f"b.md#flags: no heading #flags in {os.path.relpath(tmp_path / 'b.md', ROOT)}",
        f"#b: no heading #b in {os.path.relpath(tmp_path / 'a.md', ROOT)}"]


def test_commands_are_read_as_a_shell_reads_them():
    text = ('```bash\nT="--preset tiny \\\n   --steps 3"\npython train.py $T \\\n    --out_dir "runs/a b"   # note\n'
            "# a comment line\npip install x && python eval.py --models a > out.txt\n```\n"
            "```text\n$ python sample.py --model m\nsample output, not a command\n```\n"
            "Inline: `python merge.py --init a\n--policies b`, `train.py --lr 1` (not a command).\n")
    assert quoted_commands(text) == [
        ["python", "train.py", "--preset", "tiny", "--steps", "3", "--out_dir", "runs/a b"],
        ["pip", "install", "x"], ["python", "eval.py", "--models", "a"],
        ["python", "sample.py", "--model", "m"], ["python", "merge.py", "--init", "a", "--policies", "b"]]


@pytest.mark.parametrize("command", [
    "python train.py --lr 1e-3 --preset tiny_sentiment", "python train.py ... --workers 2", "python train.py --help",
    "CUDA_VISIBLE_DEVICES=0,1 python train.py --runs 4", "torchrun --nproc_per_node=2 train.py --device cpu ...",
    "python merge.py --policies a b ...", "python train.py --config runs/warp/job.json --out_dir runs/replay",
    'make demo ARGS="--setting sentiment --seeds 0 1"', 'make test ARGS="-k eval"', "python -m pytest -x",
    "pip install -e .", "python bench/sampling.py --lora-ranks 8,32", "python data/imdb/prepare.py --out x",
])
def test_sound_commands_pass(command, config_file):
    assert [command_problem(words, config_file) for words in split_shell(command)] == [None]


@pytest.mark.parametrize("command, problem", [
    ("python train.py --bogus 1", "unrecognized arguments: --bogus 1"),
    ("python train.py --lr fast", "invalid float value: 'fast'"),
    ("python sample.py --model m --num_sample 3", "only a prefix of one: --num_sample"),
    ("python train.py --dtype float64", "invalid choice: 'float64'"),
    ("python train.py --preset huge", "invalid choice: 'huge'"),
    ("python merge.py --policies a b --out c", "the following arguments are required: --init"),
    ("python nope.py --lr 1", "nope.py: no such script"),
    ("torchrun --nproc_per_node=2 train.py --runz 4", "unrecognized arguments: --runz 4"),
    ("make deploy", "make deploy: no such target in the Makefile"),
    ('make demo ARGS="--setting slow"', "invalid choice: 'slow'"),
])
def test_unsound_commands_are_caught(command, problem, config_file):
    [found] = [command_problem(words, config_file) for words in split_shell(command)]
    assert found is not None and problem in found, found


def test_the_readme_is_short():
    # the README is what a newcomer reads in five minutes; the reference lives in docs/
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(f.read().splitlines()) <= 250
