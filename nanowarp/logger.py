"""
What a job shows while it runs, beyond its own files: TensorBoard or Weights & Biases logging
(--report_to), sample completions (--log_completions), progress bars, and model cards.

Both integrations are optional extras, imported only when chosen:

    --report_to tensorboard     pip install tensorboard   (event files in OUT/tensorboard/{run}/)
    --report_to wandb           pip install wandb         (one W&B run per RL run, grouped by job)

Scalars keep the names of metrics.jsonl (reward, kl, r_beta, length, ...), with the step as x;
completions go to a text table.
"""

import json
import os
import sys

from tqdm.auto import tqdm

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # what to pip install for each


class Logger:
    """One logged run: `name` (e.g. iter_1/run_0) of the job in `out_dir` (the W&B group)."""

    def __init__(self, report_to, out_dir, name, config=None):
        assert report_to in REPORT_TO, report_to
        self.report_to, self.writer, self.run = report_to, None, None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError(missing("tensorboard")) from None
            self.writer = SummaryWriter(os.path.join(out_dir, "tensorboard", name))
        elif report_to == "wandb":
            try:
                import wandb
            except ImportError:
                raise ValueError(missing("wandb")) from None
            job = os.path.basename(os.path.abspath(out_dir))
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "nanowarp"), group=job,
                                  name=f"{job}/{name}", dir=out_dir, config=config)

    def scalars(self, row, step):
        """Every number of a metrics row under its own name, but the run's coordinates (iteration,
        run: the run itself; step: the x axis)."""
        numbers = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iteration", "run", "step")}
        if self.writer is not None:
            for k, v in numbers.items():
                self.writer.add_scalar(k, v, step)
        elif self.run is not None:
            self.run.log(numbers, step=step)

    def completions(self, rows, step):
        """Sample completions (dicts of prompt, completion, reward, kl) as a text table."""
        if self.writer is not None:
            lines = ["| prompt | completion | reward | kl |", "|---|---|---|---|"]
            lines += [f"| {cell(r['prompt'])} | {cell(r['completion'])} | {r['reward']:+.3f} | {r['kl']:.3f} |"
                      for r in rows]
            self.writer.add_text("completions", "\n".join(lines), step)
        elif self.run is not None:
            import wandb
            columns = ["prompt", "completion", "reward", "kl"]
            self.run.log({"completions": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])},
                         step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        elif self.run is not None:
            self.run.finish()


def missing(package):
    return f"--report_to {package} needs the {package} package: pip install {PACKAGES[package]}"


def check_report_to(report_to):
    """Fail early, before any training, when the chosen integration is not installed."""
    if report_to not in REPORT_TO:
        raise ValueError(f"--report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to != "none":
        try:
            __import__("torch.utils.tensorboard" if report_to == "tensorboard" else "wandb")
        except ImportError:
            raise ValueError(missing(report_to)) from None


def cell(text):
    """Text for one cell of a Markdown table."""
    return text.replace("|", "\\|").replace("\n", " ")


def append_jsonl(path, rows):
    """Append rows to a JSONL file in one write (O_APPEND): rows of two workers never mix."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def completion_rows(tokenizer, prompts, tokens, lengths, rewards, kls, n=4):
    """n rows, evenly spaced over the batch (distinct prompts under RLOO), of prompt and completion
    text (EOS dropped), reward and KL. prompts: token id lists; tokens (B, N); the rest (B,)."""
    rows = list(range(0, len(prompts), max(1, len(prompts) // n)))[:n]
    texts = tokenizer.decode_batch([prompts[i] for i in rows], skip_special_tokens=True)
    ids = tokens.tolist()
    completions = tokenizer.decode_batch([ids[i][:int(lengths[i])] for i in rows], skip_special_tokens=True)
    return [dict(prompt=p, completion=c, reward=float(rewards[i]), kl=float(kls[i]))
            for i, p, c in zip(rows, texts, completions)]


def progress(iterable=None, desc=None, total=None, **kw):
    """A tqdm progress bar on stderr, off when stderr is not a terminal (logs stay clean)."""
    return tqdm(iterable, desc=desc, total=total, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True,
                **kw)
