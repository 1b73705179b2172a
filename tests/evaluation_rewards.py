"""Reward functions the evaluation tests name by dotted path (``evaluation_rewards.yes_reward``),
as a user's ``--reward_funcs my_rewards.f`` would."""


def yes_reward(completions, **kwargs):
  """How often the completion says "yes" (what the test's SFT policy is taught to say)."""
  del kwargs
  return [float(str(c).count("yes")) for c in completions]


def length_reward(completion_ids, **kwargs):
  """A length-only judge: the completion's length in tokens."""
  del kwargs
  return [float(len(ids)) for ids in completion_ids]
