"""The reward sources one piece at a time (nanowarp/reward.py), in milliseconds: what load_reward passes
to each source, the texts they read, the request a reward server gets and how its failures are retried
and reported, the names the sources are logged under, and the messages that name a bad row. The jobs
that use them are in test_rewards.py and test_serve_reward.py."""

import json
import os
import threading
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import nanowarp.reward
from conftest import ROOT
from nanowarp.config import parse_args
from nanowarp.hub import CheckpointError
from nanowarp.reward import (Reward, RewardError, RewardFunction, RewardModel, RewardServer, Texts, decode_texts,
                             eos_penalty, load_classifier, load_reward, request_body, rewarded_label, unique_names)
from nanowarp.tokenizer import EOS, load_tokenizer

KEYWORD = os.path.join(ROOT, "examples", "rewards", "rewards.py") + ":keyword_reward"
TEXTS = Texts(prompts=["A film", "The plot", "It"], completions=[" was a fine film", " was bad", " was great fun"],
              queries=["A film was a fine film", "The plot was bad", "It was great fun"])
COLUMNS = {"keyword": ["fine", "good", "FUN"], "label": [1, 0, 1]}


def function(folder, body, name="fn", args="prompts, completions, **columns"):
    """A RewardFunction of a file holding `def name(args): body`."""
    path = os.path.join(folder, f"{name}.py")
    with open(path, "w") as f:
        f.write(f"def {name}({args}):\n    {body}\n")
    return RewardFunction(f"{path}:{name}")


# ---- texts --------------------------------------------------------------------------------------

def test_decoded_texts_hold_no_special_token(bpe_dir):
    tokenizer = load_tokenizer(bpe_dir)
    eos = tokenizer.token_to_id(EOS)
    prompt, completion = tokenizer.encode("A film").ids, tokenizer.encode(" was fine").ids
    tokens = torch.tensor([completion + [eos, eos, eos]])  # EOS, then padding that lengths leaves out
    texts = decode_texts(tokenizer, [[eos] + prompt], tokens, torch.tensor([len(completion) + 1]))
    assert (texts.prompts, texts.completions, texts.queries) == (["A film"], [" was fine"], ["A film was fine"])


# ---- reward models ------------------------------------------------------------------------------

def test_an_unknown_model_type_is_named_with_its_config_and_the_known_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError) as error:
        load_classifier(str(tmp_path))
    assert str(error.value) == (f"unknown model_type 'bert' in {tmp_path / 'config.json'}: a reward model must be one "
                                f"of {', '.join(nanowarp.reward.CLASSIFIERS)}")


def test_rewarded_label_names_the_model_and_its_labels():
    labels = {0: "NEGATIVE", 1: "POSITIVE"}
    with pytest.raises(ValueError, match=r"^the reward model has no label 'good'; its labels are 'NEGATIVE', "
                                         r"'POSITIVE'$"):
        rewarded_label(labels, "good")
    with pytest.raises(ValueError, match=r"^the reward model has no label '7'"):
        rewarded_label(labels, "7")
    with pytest.raises(CheckpointError, match=r"^the reward model has no label named like 'positive'"):
        rewarded_label({0: "a", 1: "b"})


def test_a_reward_model_reads_what_input_says_in_its_dtype_and_is_named_by_its_folder(tiny_reward_dir):
    model = RewardModel(tiny_reward_dir, input="completion")
    assert model(TEXTS, {}).tolist() == model.score(TEXTS.completions).tolist()
    assert model(TEXTS, {}).tolist() != model.score(TEXTS.queries).tolist()
    default = RewardModel(tiny_reward_dir)
    assert default(TEXTS, {}).tolist() == default.score(TEXTS.queries).tolist()
    assert next(RewardModel(tiny_reward_dir, dtype=torch.bfloat16).model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=rf"^the reward model {tiny_reward_dir} has no label 'x'"):
        RewardModel(tiny_reward_dir, label="x")


def test_set_scoring_defaults_to_the_probability_of_positive(tiny_reward_dir):
    model = RewardModel(tiny_reward_dir, kind=None)
    model.set_scoring()
    assert model.score(TEXTS.queries).tolist() == RewardModel(tiny_reward_dir).score(TEXTS.queries).tolist()
    assert model.score(TEXTS.queries).tolist() != RewardModel(tiny_reward_dir, kind="logit").score(TEXTS.queries).tolist()


# ---- reward functions ---------------------------------------------------------------------------

def test_a_reward_function_gets_the_prompts_completions_and_columns(tmp_path):
    fn = function(str(tmp_path), "return [len(p) + len(c) + l for p, c, l in zip(prompts, completions, label)]",
                  args="prompts, completions, label, **columns")
    assert fn(TEXTS, COLUMNS) == [6 + 16 + 1, 8 + 8 + 0, 2 + 14 + 1]


def test_a_reward_function_path_may_hold_colons(tmp_path):
    folder = tmp_path / "a:b"
    folder.mkdir()
    assert function(str(folder), "return [1.0] * len(prompts)")(TEXTS, {}) == [1.0] * 3


def test_a_reward_function_spec_must_name_a_py_file(tmp_path):
    (tmp_path / "f.txt").write_text("def f(**kw):\n    return []\n")
    with pytest.raises(ValueError, match="expected FILE.py:NAME"):
        RewardFunction(f"{tmp_path / 'f.txt'}:f")


def test_a_reward_function_that_fails_to_import_is_named(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("1 / 0\n")
    with pytest.raises(ValueError, match=rf"^--reward_fn {path}:f: importing {path} raised ZeroDivisionError: "
                                         r"division by zero$"):
        RewardFunction(f"{path}:f")


@pytest.mark.parametrize("body, message", [
    ("return 3.0", r"returned float, not one float per completion"),
    ("return [1.0]", r"returned 1 rewards for 0 completions \(the first: none\)"),
], ids=["not-a-list", "empty-batch"])
def test_what_a_reward_function_returns_is_checked(tmp_path, body, message):
    fn = function(str(tmp_path), body)
    texts = TEXTS if "float," in message else TEXTS[0:0]
    with pytest.raises(RewardError, match=rf"^the reward function {fn.spec} {message}$"):
        Reward([fn]).score(texts, None, {} if len(texts) == 0 else COLUMNS)


def test_rewards_come_back_as_float32_from_a_tensor_or_integers(tmp_path):
    for body in ("return [1, 0, 2]", "import torch; return torch.tensor([1, 0, 2])"):
        _, parts = Reward([function(str(tmp_path), body)]).score(TEXTS, None, COLUMNS)
        assert parts["fn"].dtype == torch.float32 and parts["fn"].tolist() == [1.0, 0.0, 2.0]


def test_a_bad_row_is_shown_with_every_column_each_cut_short(tmp_path):
    long = Texts(["p" * 100] * 2, ["c" * 100] * 2, ["pc"] * 2)
    columns = {"keyword": ["k" * 100] * 2, "label": [0, 1]}
    fn = function(str(tmp_path), "return [1.0, float('inf')]")
    with pytest.raises(RewardError) as error:
        Reward([fn]).score(long, None, columns)
    assert str(error.value) == (f"the reward function {fn.spec} returned inf at row 1 (prompt {'p' * 80!r}, completion "
                                f"{'c' * 80!r}, keyword {'k' * 60!r}, label '1'): a reward must be a finite number")


# ---- reward servers -----------------------------------------------------------------------------

class Recorded(BaseHTTPRequestHandler):
    """Answers each POST with the server's next scripted (status, body, delay) and records the request."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.requests.append((dict(self.headers), json.loads(body)))
        status, answer, delay = self.server.answers.pop(0) if self.server.answers else (200, b'{"rewards": []}', 0)
        threading.Event().wait(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
        except OSError:  # a client that timed out has gone
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def recording():
    """A server that records what it is sent: (url, its list of (headers, JSON body), its answers to give)."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorded)
    httpd.requests, httpd.answers, httpd.daemon_threads = [], [], True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/get_reward", httpd.requests, httpd.answers
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def sleeps(monkeypatch):
    """The back-off's sleeps, recorded instead of slept."""
    slept = []
    monkeypatch.setattr(nanowarp.reward.time, "sleep", slept.append)
    return slept


def test_request_body_sends_the_label_column_as_strings_or_empty_labels():
    body = request_body(TEXTS, COLUMNS, "label")
    assert body == {"query": TEXTS.queries, "prompts": TEXTS.prompts, "labels": ["1", "0", "1"],
                    "completions": TEXTS.completions, "columns": COLUMNS}
    assert request_body(TEXTS, COLUMNS)["labels"] == ["", "", ""]


def test_a_server_gets_the_body_as_json_with_the_token_of_the_environment(recording, monkeypatch):
    url, requests, answers = recording
    monkeypatch.setenv("NANOWARP_REWARD_API_KEY", "from-env")
    answers.append((200, b'{"rewards": [0.5, 1, 2]}', 0))
    assert RewardServer(url, label_key="label")(TEXTS, COLUMNS) == [0.5, 1, 2]
    RewardServer(url, api_key="given")(TEXTS, COLUMNS)
    (headers, body), (given, _) = requests
    assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer from-env"
    assert body == request_body(TEXTS, COLUMNS, "label")
    assert given["Authorization"] == "Bearer given"
    monkeypatch.delenv("NANOWARP_REWARD_API_KEY")
    RewardServer(url)(TEXTS, COLUMNS)
    assert "Authorization" not in requests[-1][0]


def test_a_failing_server_is_tried_again_with_a_doubling_back_off(recording, sleeps):
    url, requests, answers = recording
    answers += [(500, b"down \xff" + b"x" * 400, 0)] * 4
    with pytest.raises(RewardError) as error:
        RewardServer(url)(TEXTS, COLUMNS)
    assert str(error.value) == f"the reward server {url} failed 4 times, last with HTTP 500: down \ufffd{'x' * 294}"
    assert len(requests) == 4 and sleeps == [1.0, 2.0, 4.0]


def test_a_forbidden_request_is_not_tried_again(recording, sleeps):
    url, requests, answers = recording
    answers.append((403, b"forbidden", 0))
    with pytest.raises(RewardError, match=r"failed 1 times, last with HTTP 403: forbidden$"):
        RewardServer(url)(TEXTS, COLUMNS)
    assert len(requests) == 1 and sleeps == []


def test_an_answer_that_is_not_json_is_named(recording, sleeps, monkeypatch):
    url, requests, answers = recording
    monkeypatch.setattr(RewardServer, "RETRIES", 0)
    answers.append((200, b"not json", 0))
    with pytest.raises(RewardError, match=r"failed 1 times, last with JSONDecodeError: Expecting value"):
        RewardServer(url)(TEXTS, COLUMNS)


def test_a_server_slower_than_the_timeout_fails(recording, sleeps, monkeypatch):
    url, requests, answers = recording
    monkeypatch.setattr(RewardServer, "RETRIES", 0)
    monkeypatch.setattr(RewardServer, "TIMEOUT", 0.1)
    answers.append((200, b'{"rewards": [1, 1, 1]}', 1.0))
    with pytest.raises(RewardError, match=r"failed 1 times, last with (TimeoutError|URLError).*timed out"):
        RewardServer(url)(TEXTS, COLUMNS)


def test_a_server_address_must_be_http_or_https():
    assert RewardServer("https://example.org/reward").url == "https://example.org/reward"
    with pytest.raises(ValueError, match=r"^--reward_url 'example.org': expected an http:// or https:// address, "
                                         r"e.g. http://127.0.0.1:5000/get_reward$"):
        RewardServer("example.org")


# ---- the reward a config names ------------------------------------------------------------------

def test_load_reward_passes_every_flag_to_its_sources(tiny_reward_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("NANOWARP_REWARD_API_KEY", raising=False)
    cfg = parse_args(["--reward_model", tiny_reward_dir, "--reward_kind", "logit", "--reward_label", "NEGATIVE",
                      "--reward_input", "completion", "--reward_fn", KEYWORD, "--reward_url", "http://a/r",
                      "https://b/r", "--label_key", "keyword", "--no_eos_penalty", "-2.5",
                      "--reward_weights", "1", "2", "3", "4"])
    cfg = types.SimpleNamespace(**{**vars(cfg), "reward_api_key": "token"})
    reward = load_reward(cfg, dtype=torch.bfloat16, batch_size=5)
    model, fn, first, second = reward.sources
    assert (model.kind, model.positive, model.input, model.batch_size, model.device) == \
        ("logit", 0, "completion", 5, "cpu")
    assert next(model.model.parameters()).dtype == torch.bfloat16
    assert fn.spec == KEYWORD
    assert [(s.url, s.label_key, s.api_key) for s in (first, second)] == [("http://a/r", "keyword", "token"),
                                                                          ("https://b/r", "keyword", "token")]
    assert reward.weights == [1.0, 2.0, 3.0, 4.0] and reward.no_eos_penalty == -2.5
    assert reward.names == ["model", "keyword_reward", "url", "url_2"]
    assert load_reward(parse_args(["--reward_fn", KEYWORD, "--no_eos_penalty", "none"])).no_eos_penalty is None


@pytest.mark.parametrize("value, penalty", [(None, None), ("none", None), ("None", None), ("-0.5", -0.5), (-1, -1.0),
                                            (0, 0.0)])
def test_eos_penalty_reads_a_number_or_none(value, penalty):
    assert eos_penalty(value) == penalty and (penalty is None) == (eos_penalty(value) is None)


def test_unique_names_number_the_repeats():
    fn = types.SimpleNamespace(name="keyword_reward")
    servers = [RewardServer("http://a/r"), RewardServer("http://b/r")]
    assert unique_names([servers[0], fn, servers[1], fn, fn]) == ["url", "keyword_reward", "url_2", "keyword_reward_2",
                                                                  "keyword_reward_3"]


def test_a_reward_needs_a_source_and_one_weight_for_each():
    with pytest.raises(ValueError, match=r"^no reward: name --reward_model, --reward_fn or --reward_url$"):
        Reward([])
    fn = RewardFunction(KEYWORD)
    with pytest.raises(ValueError, match=r"^--reward_weights has 2 values for 1 reward source \(in the order "
                                         r"reward_model, reward_fn\.\.\., reward_url\.\.\.: keyword_reward\)$"):
        Reward([fn], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"^--reward_weights has 1 value for 2 reward sources .*: keyword_reward, "
                                         r"keyword_reward\)$"):
        Reward([fn, fn], [1.0])
