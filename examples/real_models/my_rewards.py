"""An example reward function for ``rlhfkit ppo reward_source=callable reward_fn=my_rewards:concise``.

Any ``module:function`` taking (prompts, responses) and returning one float per response works.
"""


def concise(prompts, responses):
    """Prefer short answers that end with a full stop: 1 for a one-sentence answer, less as it grows."""
    return [(1.0 if r.strip().endswith(".") else 0.0) - 0.02 * len(r.split()) for r in responses]
