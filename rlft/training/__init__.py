"""Training: the RL loop and what it is made of.

- ``loop.py``: ``train(config)``, the full loop (distributed, overlap, resume, evals);
- ``update.py``: one policy update from scored groups (micro-batches, backward, step);
- ``grpo.py``: the math, pure tensor functions (advantages, losses, KL, logprobs);
- ``sync.py``: pushing weights to the engine and checking that it serves them;
- ``checkpoint.py``: save, load and prune checkpoints.
"""
