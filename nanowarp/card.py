"""
Model cards: the README.md of every checkpoint train.py and merge.py write, in the Hugging Face
style (YAML metadata, then what the model is, its base model, the flags that made it, and its
final training metrics), so a folder explains itself on the Hub or on disk.
"""

import os

from nanowarp import hub


def model_card(title, what, base_model, flags=None, metrics=None):
    """The text of a README.md. flags: {name: value}; metrics: {name: value} or a list of such rows
    (one table row each, e.g. the last step of every run of an iteration)."""
    meta = ["---", "library_name: nanowarp", "tags:", "- nanowarp", "- warp", "- rlhf"]
    if hub._is_hub_id(base_model) and not os.path.exists(base_model):
        meta.append(f"base_model: {base_model}")  # the Hub links it; a local path means nothing there
    lines = meta + ["---", "", f"# {title}", "", what, "", f"Base model: `{base_model}`.", "",
                    "A checkpoint in the Hugging Face layout: `nanowarp.models.from_pretrained(folder)` or "
                    "`transformers.AutoModelForCausalLM.from_pretrained(folder)` loads it."]
    if metrics:
        rows = metrics if isinstance(metrics, list) else [metrics]
        names = list(dict.fromkeys(k for r in rows for k in r))
        lines += ["", "## Final training metrics", "", "| " + " | ".join(names) + " |",
                  "|" + "---|" * len(names)]
        lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in names) + " |" for r in rows]
    if flags:
        lines += ["", "## Flags", "", "| flag | value |", "|---|---|"]
        lines += [f"| `--{k}` | `{fmt(v)}` |" for k, v in flags.items()]
    return "\n".join(lines) + "\n"


def fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def write_card(folder, text):
    hub.write_text(os.path.join(folder, "README.md"), text)
