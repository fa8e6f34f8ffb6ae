"""serve_reward.py: any nanowarp reward over HTTP in OpenRLHF's protocol, bit for bit the in-process
rewards; bad requests answered 400 with the reason, a wrong token 401; a job whose server dies stops
with exit 2 and resumes to the uninterrupted weights once the server is back."""

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

import serve_reward
import train
from conftest import ROOT, assert_same_weights, final_weights, in_process
from nanowarp.reward import Reward, RewardError, RewardFunction, RewardServer
from test_rewards import COLUMNS, KEYWORD, TEXTS, keyword_prompts, reward_flags, reward_job  # noqa: F401 (fixtures)


# ---- serve_reward.py --------------------------------------------------------------------------------

@pytest.fixture
def server():
    """serve_reward.py's server in a thread, serving the keyword function, with a bearer token."""
    args = serve_reward.Args(reward_fn=(KEYWORD,), port=0, api_key="secret")
    reward = serve_reward.load_reward(args)
    httpd = serve_reward.make_server(args, reward, log=None)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/get_reward"
    httpd.shutdown()
    httpd.server_close()


def post(url, body, token="secret"):
    """(status, answer) of a POST of body (bytes, or an object sent as JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_server_gives_the_in_process_rewards(server):
    expected, _ = Reward([RewardFunction(KEYWORD)]).score(TEXTS, None, COLUMNS)
    got, _ = Reward([RewardServer(server, api_key="secret")]).score(TEXTS, None, COLUMNS)
    assert got.tolist() == expected.tolist() == [1.0, 0.0, 1.0]
    # an OpenRLHF client: no completions (the query minus its prompt), the labels as the column `labels`
    status, answer = post(server.replace("get_reward", "get_reward/"), {"query": TEXTS.queries,
                                                                         "prompts": TEXTS.prompts, "labels": ["x"] * 3})
    assert status == 500 and "missing 1 required positional argument: 'keyword'" in answer["error"]
    assert post(server, {"query": TEXTS.queries, "prompts": TEXTS.prompts, "columns": COLUMNS}) == \
        (200, {"rewards": [1.0, 0.0, 1.0]})


@pytest.mark.parametrize("body, reason", [
    (b"{not json", "the body is not JSON"),
    ({"prompts": ["a"]}, 'expected a JSON object with a "query" list'),
    ({"query": ["ab", "cd"], "prompts": ["a"], "completions": ["b", "d"], "columns": {"keyword": ["b", "d"]}},
     "lists of different lengths: query 2, prompts 1, completions 2, columns.keyword 2"),
    ({"query": ["ab"], "prompts": ["a"], "completions": ["b"], "columns": {"keyword": "b"}},
     '"columns" must be an object of lists'),
    ({"query": [1], "prompts": ["a"], "completions": ["b"], "columns": {"keyword": ["b"]}}, "must hold strings"),
    (b"x" * (64 * 2 ** 20 + 1), "a body of 67108865 bytes is over --max_body_mb 64"),
], ids=["not-json", "no-query", "lengths", "columns", "not-strings", "oversized"])
def test_the_server_answers_a_bad_request_400_with_the_reason(server, body, reason):
    status, answer = post(server, body)
    assert status == 400 and reason in answer["error"]
    assert post(server, {"query": ["ab"], "prompts": ["a"], "completions": ["b"], "columns": {"keyword": ["b"]}},
                token="secret")[0] == 200  # still serving


def test_the_server_refuses_a_wrong_token_and_the_client_says_so(server):
    assert post(server, {"query": []}, token="wrong")[0] == 401
    with pytest.raises(RewardError, match=r"the reward server .* failed 1 times, last with HTTP 401"):
        RewardServer(server, api_key="wrong")(TEXTS, COLUMNS)


def start_server(port=0):
    """`python serve_reward.py --reward_fn KEYWORD --port PORT` and its port (from its first line)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve_reward.py"), "--reward_fn", KEYWORD,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "serving keyword_reward on http://127.0.0.1:" in line, line
    return proc, int(line.rsplit(":", 1)[1].split("/")[0])


def test_a_job_whose_server_dies_stops_clearly_and_resumes_to_the_in_process_weights(
        job_flags, keyword_prompts, reward_job, tmp_path, monkeypatch, capsys):
    import nanowarp.jobs.folder
    proc, port = start_server()
    url = f"http://127.0.0.1:{port}/get_reward"
    monkeypatch.setattr(RewardServer, "BACKOFF", 0.05)
    monkeypatch.setattr(nanowarp.jobs.folder, "kill_point", lambda name: proc.kill() if name == "iter_1/run_1/step_1" else None)
    flags = reward_flags(job_flags, keyword_prompts, "--reward_url", url) + ["--out_dir", str(tmp_path)]
    try:
        assert in_process(train.main, flags) == 2
        assert f"train.py: error: iter_1/run_1: the reward server {url} failed 4 times, last with URLError" in \
            capsys.readouterr().err
        assert os.path.isfile(os.path.join(tmp_path, "iter_1", "run_0", "config.json"))  # the finished run is kept
        proc.wait()
        proc, _ = start_server(port)  # back, at the same address
        monkeypatch.setattr(nanowarp.jobs.folder, "kill_point", lambda name: None)
        assert in_process(train.main, flags) == 0
    finally:
        proc.kill()
        proc.wait()
    # the server's rewards are the in-process function's, bit for bit: so are the weights
    assert_same_weights(final_weights(str(tmp_path)), final_weights(reward_job))


def test_serve_reward_needs_something_to_serve(capsys):
    with pytest.raises(SystemExit) as exited:
        serve_reward.main([])
    assert exited.value.code == 2 and "nothing to serve" in capsys.readouterr().err
