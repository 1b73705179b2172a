"""NumPy reference for the next-token shift (``alignax.next_token_targets``), written as a plain loop."""

import numpy as np


def next_token_targets(input_ids, attention, completion=None, segments=None):
  """The shift by hand, one position at a time (independent of the vectorised code).

  ``targets[i, t] = input_ids[i, t + 1]``; position ``t`` is trained on iff ``t`` and ``t + 1`` are
  real tokens, ``t + 1`` is a completion token (when given) and both share a segment (when given).
  """
  input_ids, attention = np.asarray(input_ids), np.asarray(attention)
  rows, length = input_ids.shape
  targets = np.zeros((rows, length), np.int32)
  loss_mask = np.zeros((rows, length), bool)
  for i in range(rows):
    for t in range(length - 1):
      targets[i, t] = input_ids[i, t + 1]
      loss_mask[i, t] = (attention[i, t] != 0 and attention[i, t + 1] != 0
                         and (completion is None or completion[i, t + 1] != 0)
                         and (segments is None or segments[i, t] == segments[i, t + 1]))
  return targets, loss_mask
