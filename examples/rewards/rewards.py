"""
Reward functions to copy: plain Python, called as TRL calls its `reward_funcs`,

    NAME(prompts=[...], completions=[...], **columns) -> one float per completion

where prompts and completions are the decoded texts (the completion alone, without its prompt) and
columns are the prompt rows' other fields (here `keyword`), as lists aligned with them. Give one to
train.py, eval.py, sample.py or serve_reward.py as `--reward_fn examples/rewards/rewards.py:NAME`.
"""

import re


def keyword_reward(prompts, completions, keyword, **columns):
    """1 when the completion contains its row's `keyword` (a column of the prompt file), case aside; else 0."""
    return [float(k.lower() in c.lower()) for c, k in zip(completions, keyword)]


def length_reward(prompts, completions, target_words=20, **columns):
    """1 at `target_words` words, falling linearly to 0 at twice as many or none."""
    return [max(0.0, 1.0 - abs(len(c.split()) - target_words) / target_words) for c in completions]


SENTENCE = re.compile(r"^\s*[A-Z][^.!?]*[.!?]\s*$")


def format_reward(prompts, completions, **columns):
    """1 for a completion that is exactly one sentence: a capital first letter, one final . ! or ?; else 0."""
    return [float(bool(SENTENCE.match(c))) for c in completions]
