"""A user's reward functions for the GRPO tests, named in configs as `support.grpo_rewards:<name>`."""


def a_share(completions, **_):
    """The share of the letter `a` in a completion: a dense, verifiable reward a 2-layer model learns in
    a few dozen steps (tokens such as `banana` and `a` exist in the test vocabulary)."""
    return [c.count("a") / max(len(c), 1) for c in completions]


def echoes_answer(completions, answer, **_):
    """1 where the completion contains the row's `answer` column, None (no score) for an empty completion."""
    return [None if not c.strip() else float(a in c) for c, a in zip(completions, answer)]
