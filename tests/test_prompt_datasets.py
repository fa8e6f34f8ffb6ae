"""Prompt datasets (--prompts): .jsonl, .json, .parquet and text give the same prompts and columns;
`messages` rows render as transformers' apply_chat_template; every error names the file and line;
a prompt too long for the context stops train.py, eval.py and sample.py at load, before anything
trains or samples, or is cut to its last tokens by --truncate_prompts left."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import eval as eval_script
import sample as sample_cli
import train
from conftest import REVIEWS, ROOT, chat_checkpoint
from nanowarp.config import parse_args
from nanowarp.data import DataError, PromptSet, load_prompt_dataset
from nanowarp.prompts import fit_prompts, max_prompt_tokens
from nanowarp.tokenizer import EOS, load_tokenizer

ROWS = [{"prompt": "The soup tasted", "label": 1, "meta": {"id": "a"}},
        {"prompt": "  My neighbour's garden is", "label": 0, "meta": {"id": "b"}},
        {"prompt": "Émile's “favorite” scene 🎬", "label": 1, "meta": {"id": "c"}}]
LONG = " ".join(REVIEWS[:3])  # more tokens than the tiny GPT-2's context leaves beside 100 new ones

# A template that treats a system turn apart (a default one when there is none), trims contents,
# refuses unknown roles, and ends each turn with the EOS token by name.
TEMPLATE = ("{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
            "{% set messages = messages[1:] %}{% else %}{% set system = 'You review films.' %}{% endif %}"
            "<|system|>\n{{ system }}{{ eos_token }}\n{% for m in messages %}"
            "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}"
            "{% endif %}"
            "<|{{ m['role'] }}|>\n{{ m['content'] | trim }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Review this film: "}],
    [{"role": "system", "content": "You write short, kind reviews."}, {"role": "user", "content": "Jaws?"}],
    [{"role": "system", "content": "Be honest."}, {"role": "user", "content": "Did you like it?"},
     {"role": "assistant", "content": "Not really."}, {"role": "user", "content": "Why “not” — café scenes?"}],
]


def write(path, rows):
    """rows in the format the name of `path` says; returns path as a string."""
    path = str(path)
    if path.endswith(".parquet"):
        import pyarrow
        import pyarrow.parquet
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    elif path.endswith(".json"):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join((json.dumps(r, ensure_ascii=False) if path.endswith(".jsonl") else r["prompt"]) + "\n"
                            for r in rows))
    return path


@pytest.fixture(scope="module")
def chat_dir(tiny_gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 with TEMPLATE in its tokenizer_config.json."""
    return chat_checkpoint(tiny_gpt2_dir, str(tmp_path_factory.mktemp("chat")), TEMPLATE)


@pytest.fixture(scope="module")
def reference(chat_dir, tmp_path_factory):
    """transformers' tokenizer of chat_dir (it reads tokenizer.json), the reference of apply_chat_template."""
    transformers = pytest.importorskip("transformers")
    folder = str(tmp_path_factory.mktemp("reference"))
    shutil.copytree(chat_dir, folder, dirs_exist_ok=True)
    load_tokenizer(chat_dir).save(os.path.join(folder, "tokenizer.json"))
    return transformers.AutoTokenizer.from_pretrained(folder)


# ---- formats and columns -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".txt"])
def test_every_format_gives_the_prompts_and_their_columns(tiny_gpt2_dir, tmp_path, suffix):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    loaded = load_prompt_dataset(write(tmp_path / f"p{suffix}", ROWS), tokenizer)
    texts = [r["prompt"] for r in ROWS]
    assert isinstance(loaded, PromptSet) and loaded.prompts == texts  # as written: leading spaces kept
    assert loaded.ids == [tokenizer.encode(t).ids for t in texts]
    expected = {} if suffix == ".txt" else {"label": [1, 0, 1], "meta": [{"id": "a"}, {"id": "b"}, {"id": "c"}]}
    assert loaded.columns == expected


def test_prompt_key_names_the_prompt_field_and_the_rest_are_columns(tiny_gpt2_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    path = write(tmp_path / "q.jsonl", [{"question": "Is it good?", "prompt": "x"},
                                        {"question": "Why?", "prompt": "y"}])
    loaded = load_prompt_dataset(path, tokenizer, prompt_key="question")
    assert loaded.prompts == ["Is it good?", "Why?"] and loaded.columns == {"prompt": ["x", "y"]}
    with pytest.raises(DataError, match=r"q.jsonl, line 1: expected an object with a \"text\" string \(--prompt_key"):
        load_prompt_dataset(path, tokenizer, prompt_key="text")


def test_the_prompt_set_of_a_job_holds_the_columns(tiny_gpt2_dir, tiny_reward_dir, tmp_path):
    from nanowarp.rl import load_resources
    path = write(tmp_path / "p.json", ROWS)
    resources = load_resources(parse_args(["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--prompts",
                                           path, "--max_new_tokens", "8", "--device", "cpu"]))
    assert resources.prompts == load_prompt_dataset(path, load_tokenizer(tiny_gpt2_dir)).ids
    assert resources.columns == {"label": [1, 0, 1], "meta": [{"id": "a"}, {"id": "b"}, {"id": "c"}]}


# ---- errors name the file and line ---------------------------------------------------------------

@pytest.mark.parametrize("name, content, message", [
    ("a.jsonl", '{"prompt": "ok"}\n\n{"prompt": "ok", \n', r"a.jsonl, line 3: not JSON"),
    ("a.jsonl", '{"prompt": "a", "label": 1}\n{"prompt": "b"}\n', r"a.jsonl, line 2: no field label unlike the first"),
    ("a.jsonl", '{"prompt": "a"}\n{"prompt": "b", "label": 1}\n', r"a.jsonl, line 2: field label unlike the first"),
    ("a.jsonl", '{"prompt": "a"}\n["b"]\n', r"a.jsonl, line 2: expected an object with a \"prompt\" string"),
    ("a.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n', r"a.jsonl, line 2: the prompt encodes to no tokens"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n{"messages": "b"}\n',
     r"a.jsonl, line 2: \"messages\" must be a list of messages"),
    ("a.jsonl", '{"messages": [{"role": "user"}]}\n', r"a.jsonl, line 1: \"messages\" must be a list of messages"),
    ("a.jsonl", '{"prompt": [{"role": "user", "content": "a"}]}\n', r"a.jsonl, line 1: a list of messages is "
                                                                     r"rendered with the policy's chat template, and"),
    ("a.json", '[{"prompt": "a"},\n {"prompt": "b",}]', r"a.json, line 2: not JSON"),
    ("a.json", '{"prompt": "a"}', r"a.json: expected a list of objects, got dict"),
    ("a.json", '[{"prompt": "a"}, {"prompt": 3}]', r"a.json, row 2: \"prompt\" must be a string or a list"),
    ("a.json", "[]", r"a.json holds no prompts"),
    ("a.txt", "\n  \n", r"a.txt holds no prompts"),
    ("a.parquet", "not parquet", r"cannot read .*a.parquet as a Parquet table"),
])
def test_bad_rows_are_named_by_file_and_line(tiny_gpt2_dir, tmp_path, name, content, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_prompt_dataset(str(tmp_path / name), load_tokenizer(tiny_gpt2_dir), template=tiny_gpt2_dir)


def test_parquet_without_pyarrow_is_a_clear_error_and_other_formats_never_import_it(tiny_gpt2_dir, tmp_path,
                                                                                   monkeypatch):
    path = write(tmp_path / "p.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"p.parquet needs pyarrow, which is not installed: pip install pyarrow"):
        load_prompt_dataset(path, load_tokenizer(tiny_gpt2_dir))
    code = ("import sys; from nanowarp.prompts import load_prompt_dataset; from nanowarp.tokenizer import "
            f"load_tokenizer; load_prompt_dataset({write(tmp_path / 'p.jsonl', ROWS)!r}, load_tokenizer("
            f"{tiny_gpt2_dir!r})); assert 'pyarrow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# ---- conversations -------------------------------------------------------------------------------

def test_messages_rows_render_as_apply_chat_template(chat_dir, reference, tmp_path):
    tokenizer = load_tokenizer(chat_dir)
    rows = [{"messages": c, "id": i} for i, c in enumerate(CONVERSATIONS)]
    for path in (write(tmp_path / "c.jsonl", rows), write(tmp_path / "c.parquet", rows),  # and as TRL writes them:
                 write(tmp_path / "trl.json", [{"prompt": c, "id": i} for i, c in enumerate(CONVERSATIONS)])):
        loaded = load_prompt_dataset(path, tokenizer, template=chat_dir)
        expected = [reference.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
        assert loaded.prompts == expected and loaded.columns == {"id": [0, 1, 2]}
        assert loaded.ids == [reference(text, add_special_tokens=False)["input_ids"] for text in expected]
    assert "Be honest.<|endoftext|>\n<|user|>\nDid you like it?" in expected[2]  # system and earlier turns kept
    assert expected[1].endswith("<|user|>\nJaws?<|endoftext|>\n<|assistant|>\n")  # the assistant's turn opened


def test_chat_template_makes_a_plain_prompt_the_users_turn(chat_dir, reference, tmp_path):
    tokenizer = load_tokenizer(chat_dir)
    path = write(tmp_path / "p.txt", ROWS)
    loaded = load_prompt_dataset(path, tokenizer, template=chat_dir, chat=True)
    assert loaded.prompts == [reference.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                                            add_generation_prompt=True) for r in ROWS]
    assert load_prompt_dataset(path, tokenizer, template=chat_dir).prompts == [r["prompt"] for r in ROWS]  # no flag


def test_a_conversation_the_template_refuses_is_named(chat_dir, tmp_path):
    path = write(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]},
                                        {"messages": [{"role": "tool", "content": "x"}]}])
    with pytest.raises(DataError, match=r"c.jsonl, line 2: the chat template of .* refuses it \(unknown role tool\)"):
        load_prompt_dataset(path, load_tokenizer(chat_dir), template=chat_dir)


# ---- the length of every prompt, checked at load -------------------------------------------------

def test_fit_prompts_names_the_long_one_or_keeps_its_last_tokens_after_the_bos():
    where = lambda i: f"p.txt, line {i + 1}"  # noqa: E731
    assert fit_prompts([[1, 2], [3]], 2, "none", where) == [[1, 2], [3]]
    with pytest.raises(DataError, match=r"p.txt, line 2: the prompt has 3 tokens, more than the 2 .*truncate_prompts"):
        fit_prompts([[1, 2], [7, 3, 4]], 2, "none", where)
    assert fit_prompts([[1, 2], [7, 3, 4]], 2, "left", where) == [[1, 2], [3, 4]]
    assert fit_prompts([[9, 5, 6, 7], [5, 6, 7, 8]], 3, "left", where, bos=[9]) == [[9, 6, 7], [6, 7, 8]]
    assert max_prompt_tokens(128, 100) == 28
    with pytest.raises(DataError, match="--max_new_tokens 128 leaves no room for a prompt"):
        max_prompt_tokens(128, 128)


@pytest.fixture
def long_prompts(tmp_path):
    """Three prompts, the third (line 3) too long for the tiny GPT-2 beside 100 new tokens."""
    return write(tmp_path / "long.txt", [{"prompt": "The soup tasted"}, {"prompt": "A film"}, {"prompt": LONG}])


def test_train_stops_at_load_on_a_long_prompt(tiny_gpt2_dir, tiny_reward_dir, prepared_imdb_dir, long_prompts,
                                              tmp_path, capsys):
    out = str(tmp_path / "out")
    flags = ["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--max_new_tokens", "100", "--device", "cpu",
             "--out_dir", out]
    assert train.main(flags + ["--prompts", long_prompts]) == 2
    err = capsys.readouterr().err
    assert "long.txt, line 3: the prompt has" in err and "more than the 28 the policy's context leaves" in err
    assert not os.path.exists(out)  # nothing started
    assert train.main(flags + ["--data", prepared_imdb_dir, "--max_new_tokens", "125"]) == 2  # --data's prompts too
    assert "prompts_train.npz, prompt 1: the prompt has" in capsys.readouterr().err


def test_train_truncate_left_keeps_the_last_tokens(tiny_gpt2_dir, tiny_reward_dir, long_prompts):
    from nanowarp.rl import load_resources
    resources = load_resources(parse_args(["--policy", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--prompts",
                                           long_prompts, "--max_new_tokens", "100", "--truncate_prompts", "left",
                                           "--device", "cpu"]))
    full = load_prompt_dataset(long_prompts, load_tokenizer(tiny_gpt2_dir)).ids
    assert resources.prompts[:2] == full[:2] and resources.prompts[2] == full[2][-28:] and len(full[2]) > 28


def test_eval_stops_at_load_on_a_long_prompt_or_truncates_it(tiny_gpt2_dir, tiny_reward_dir, long_prompts, tmp_path,
                                                             capsys):
    flags = ["--models", tiny_gpt2_dir, "--ref", tiny_gpt2_dir, "--reward_model", tiny_reward_dir, "--prompts",
             long_prompts, "--max_new_tokens", "100", "--device", "cpu", "--plot", "none", "--out",
             str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as exited:
        eval_script.main(flags)
    assert exited.value.code == 2 and "long.txt, line 3: the prompt has" in capsys.readouterr().err
    eval_script.main(flags + ["--n_prompts", "2"])  # the first two only: the long one is not loaded
    eval_script.main(flags + ["--truncate_prompts", "left"])
    assert json.load(open(tmp_path / "r.json"))[0]["n_prompts"] == 3


def test_sample_stops_at_load_on_a_long_prompt_or_truncates_it(tiny_gpt2_dir, long_prompts, capsys):
    def run(*flags):
        sample_cli.main(["--model", tiny_gpt2_dir, "--num_samples", "1", "--max_new_tokens", "100", "--device", "cpu",
                         "--json", *flags])
        return json.loads(capsys.readouterr().out)

    for flags, named in ((["--prompts", long_prompts], "long.txt, line 3"), (["--prompt", "Hi", "--prompt", LONG],
                                                                              "--prompt 2")):
        with pytest.raises(SystemExit) as exited:
            run(*flags)
        assert exited.value.code == 2 and f"{named}: the prompt has" in capsys.readouterr().err
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    result = run("--prompt", LONG, "--truncate_prompts", "left")
    assert result["prompts"][0]["prompt"] == tokenizer.decode(tokenizer.encode(LONG).ids[-28:])


def test_sample_chat_template_and_dtype(chat_dir, reference, monkeypatch, capsys):
    dtypes = []
    sample_model = sample_cli.sample_model

    def recording(model, *args, **kwargs):
        dtypes.append(next(model.parameters()).dtype)
        return sample_model(model, *args, **kwargs)

    monkeypatch.setattr(sample_cli, "sample_model", recording)
    sample_cli.main(["--model", chat_dir, "--prompt", "Jaws?", "--chat_template", "--dtype", "bfloat16",
                     "--num_samples", "2", "--max_new_tokens", "4", "--device", "cpu", "--json"])
    result = json.loads(capsys.readouterr().out)
    rendered = reference.apply_chat_template([{"role": "user", "content": "Jaws?"}], tokenize=False,
                                             add_generation_prompt=True)
    assert result["prompts"][0]["prompt"] == rendered.replace(EOS, "")  # decoded without special tokens
    assert dtypes == [torch.bfloat16] and len(result["prompts"][0]["models"][0]["samples"]) == 2
