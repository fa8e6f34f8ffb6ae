"""
Serve a reward over HTTP, in OpenRLHF's remote-reward protocol: any reward nanowarp computes in
process (a reward model, reward functions, weighted), for train.py / eval.py / sample.py --reward_url
on this machine or another, or for an OpenRLHF job.

    python serve_reward.py --reward_fn examples/rewards/keyword.py:keyword_reward --port 5000
    python train.py ... --reward_url http://127.0.0.1:5000/get_reward

POST /get_reward with JSON {"query": [prompt + completion, ...], "prompts": [...], "labels": [...]}
answers {"rewards": [...]}, one float per query. A nanowarp client also sends "completions" (each
completion alone) and "columns" (the prompt rows' other fields, {name: [...]}), and the functions get
exactly the arguments they get in process; from another client, completions are the queries with
their prompt cut off, and the labels reach the functions as the column `labels`. The no-EOS rule
is the client's (it knows which completions ended). A bad request (not JSON, lists of different
lengths, a body over --max_body_mb) is answered 400 with the reason, a wrong or missing token 401
(with --api_key or $NANOWARP_REWARD_API_KEY set), a reward that fails 500 with its error.
Standard library only (http.server); bound to 127.0.0.1 unless --host says otherwise.
"""

import json
import os
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere without installing

from nanowarp.config import fail, flag, parse_args as parse_flags, resolve_device, same_flag  # noqa: E402
from nanowarp.hub import CheckpointError  # noqa: E402
from nanowarp.reward import RewardError, Texts, load_reward  # noqa: E402


@dataclass
class Args:
    reward_model: str = flag(None, "reward model served: a sequence classifier or a scalar reward model, Hub id or "
                                   "local folder", metavar="DIR")
    reward_fn: tuple = same_flag("reward_fn")
    reward_weights: tuple = flag((), "one weight per reward source, in the order reward_model, reward_fn...; "
                                     "none given: 1 each", nargs="+", type=float, metavar="W")
    reward_kind: str = same_flag("reward_kind")
    reward_label: str = same_flag("reward_label")
    reward_input: str = same_flag("reward_input")
    host: str = flag("127.0.0.1", "address to listen on: 127.0.0.1 serves this machine only, 0.0.0.0 every network")
    port: int = flag(5000, "port to listen on (0: a free one, printed)")
    api_key: str = flag(None, "bearer token every request must carry (Authorization: Bearer TOKEN); None: "
                              "$NANOWARP_REWARD_API_KEY, or no check when that is unset", metavar="TOKEN")
    max_body_mb: float = flag(64.0, "largest request body accepted, in MiB")
    batch_size: int = flag(64, "texts the reward model scores at a time")
    device: str = flag("auto", "cpu, cuda, cuda:N, or auto")
    dtype: str = flag("float32", "the reward model's weights and forward pass", choices=["float32", "bfloat16"])

    # load_reward's other settings: a server has no URLs of its own, and the client applies the no-EOS rule
    reward_url, no_eos_penalty, label_key, reward_api_key = (), "none", None, None


class BadRequest(ValueError):
    """A request the server answers 400, with this reason."""


def read_request(body):
    """(Texts, columns) of a request body (bytes), or BadRequest saying what is wrong with it."""
    try:
        request = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"the body is not JSON: {e}")
    if not isinstance(request, dict) or not isinstance(request.get("query"), list):
        raise BadRequest('expected a JSON object with a "query" list (and "prompts", "labels")')
    queries = request["query"]
    prompts = request.get("prompts", [""] * len(queries))
    completions = request.get("completions")
    if completions is None:  # another client: the query is prompt + completion
        if not isinstance(prompts, list) or not all(isinstance(q, str) and isinstance(p, str) and q.startswith(p)
                                                    for q, p in zip(queries, prompts)):
            raise BadRequest('without "completions", each query must be a string that starts with its prompt')
        completions = [q[len(p):] for q, p in zip(queries, prompts)]
    columns = request.get("columns")
    if columns is None:
        columns = {"labels": request["labels"]} if "labels" in request else {}
    if not isinstance(columns, dict) or not all(isinstance(v, list) for v in columns.values()):
        raise BadRequest('"columns" must be an object of lists, {name: [one value per query]}')
    lists = {"query": queries, "prompts": prompts, "completions": completions,
             **({"labels": request["labels"]} if "labels" in request else {}),
             **{f"columns.{k}": v for k, v in columns.items()}}
    lengths = {name: len(v) if isinstance(v, list) else None for name, v in lists.items()}
    if any(n != len(queries) for n in lengths.values()):
        raise BadRequest("lists of different lengths: " + ", ".join(f"{k} {n}" for k, n in lengths.items()))
    if not all(isinstance(t, str) for t in [*queries, *prompts, *completions]):
        raise BadRequest('"query", "prompts" and "completions" must hold strings')
    return Texts(prompts, completions, queries), columns


def make_server(args, reward, log=print):
    """A ThreadingHTTPServer answering POST /get_reward with `reward` (a nanowarp.reward.Reward, one
    request scored at a time); its address is server.server_address."""
    token = args.api_key or os.environ.get("NANOWARP_REWARD_API_KEY")
    lock, max_bytes = threading.Lock(), int(args.max_body_mb * 2 ** 20)

    class Handler(BaseHTTPRequestHandler):
        def answer(self, status, obj):
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            if self.path.rstrip("/") != "/get_reward":
                return self.answer(404, {"error": f"no {self.path}: POST /get_reward"})
            if token and self.headers.get("Authorization") != f"Bearer {token}":
                return self.answer(401, {"error": "missing or wrong bearer token (Authorization: Bearer TOKEN)"})
            try:
                size = int(self.headers.get("Content-Length", ""))
                if size > max_bytes:
                    left = size
                    while left > 0:  # read and dropped, so that the client gets to read the answer
                        left -= len(self.rfile.read(min(2 ** 20, left))) or left
                    raise BadRequest(f"a body of {size} bytes is over --max_body_mb {args.max_body_mb:g}")
                texts, columns = read_request(self.rfile.read(size))
            except BadRequest as e:
                return self.answer(400, {"error": str(e)})
            except ValueError:
                self.close_connection = True
                return self.answer(400, {"error": "no Content-Length header"})
            try:
                with lock:  # one batch at a time through the model
                    rewards, _ = reward.score(texts, None, columns)
            except RewardError as e:
                return self.answer(500, {"error": str(e)})
            self.answer(200, {"rewards": rewards.tolist()})

        def log_message(self, format, *a):  # one line per request on stderr, as http.server does, unless quiet
            if log is not None:
                super().log_message(format, *a)

    return ThreadingHTTPServer((args.host, args.port), Handler)


def parse_args(argv=None):
    return parse_flags(argv, Args, presets=None, description=__doc__)


def main(argv=None):
    args = parse_args(argv)
    if not args.reward_model and not args.reward_fn:
        fail("serve_reward.py", "nothing to serve: give --reward_model DIR and/or --reward_fn FILE.py:NAME")
    try:
        reward = load_reward(args, resolve_device(args.device), getattr(torch, args.dtype), args.batch_size)
        server = make_server(args, reward)
    except (CheckpointError, ValueError, OSError) as e:
        fail("serve_reward.py", str(e))
    host, port = server.server_address[:2]
    print(f"serving {', '.join(reward.names)} on http://{host}:{port}/get_reward", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
