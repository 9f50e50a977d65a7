"""The tests' models are tiny: one CPU thread runs them fastest, and is not slowed down by a busy machine
(two threads on two shared cores made a training step up to ten times slower)."""

import torch

torch.set_num_threads(1)
