"""
Prompts for chat models (--chat_template): each prompt becomes the user's turn of a conversation,
rendered with the chat template the checkpoint ships, and the assistant's turn is opened, so that
the completion is the model's reply. A prompt dataset's `messages` rows (prompts.load_prompt_dataset)
are whole conversations, rendered the same way: system and earlier turns as written.

The template is a Jinja2 template in tokenizer_config.json ("chat_template") or chat_template.jinja;
it is rendered as transformers' apply_chat_template renders it (sandboxed, trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text, the
tokenizer's special tokens by name) and then tokenized without adding special tokens, since the
template writes its own. Jinja2 is an optional dependency, imported only here.
"""

import json
import os
from datetime import datetime

from nanowarp import hub

NO_JINJA = "--chat_template renders the model's chat template with Jinja2, which is not installed: pip install jinja2"


def load_template(folder):
    """(template text, {special token name: text}) of a checkpoint folder, or a CheckpointError."""
    config = {}
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {t["name"]: t["template"] for t in template}.get("default")
    jinja_file = os.path.join(folder, "chat_template.jinja")  # where transformers >= 4.43 saves it
    if template is None and os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            template = f.read()
    if not template:
        raise hub.CheckpointError(f"{folder} has no chat template (tokenizer_config.json's chat_template or "
                                  f"chat_template.jinja): leave out --chat_template, or use a chat model's checkpoint")
    special = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items()
               if k.endswith("_token") and isinstance(v, (str, dict))}
    return template, special


def compile_template(template):
    """The Jinja2 template, compiled in a sandbox the way transformers compiles chat templates."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ValueError(NO_JINJA) from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def render(template, special, text):
    """One prompt as a user turn, the assistant's turn opened: the text the model continues."""
    return template.render(messages=[{"role": "user", "content": text}], add_generation_prompt=True, **special)


def renderer(folder):
    """A function: a conversation (a list of {"role", "content"} messages) -> its text in `folder`'s
    chat template, the assistant's turn opened, as apply_chat_template(messages, add_generation_prompt=True)
    writes it; a ValueError for one the template refuses (its raise_exception, a wrong message)."""
    template, special = load_template(folder)
    compiled = compile_template(template)
    import jinja2  # compile_template found it

    def render_messages(messages):
        try:
            return compiled.render(messages=messages, add_generation_prompt=True, **special)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template of {folder} refuses it ({e})") from None
    return render_messages


def chat_prompts(prompts, tokenizer, folder):
    """Prompts (lists of token ids of `tokenizer`) -> the token ids of each as a user turn of
    `folder`'s chat template, the assistant's turn opened."""
    render_messages = renderer(folder)
    texts = [render_messages([{"role": "user", "content": text}])
             for text in tokenizer.decode_batch(prompts, skip_special_tokens=True)]
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]  # the template wrote its own
