"""Supervised finetuning (``rlft sft``): transcripts -> token ids + loss masks -> a trained policy.

``transcripts``: loading and rendering chat transcripts (the data half); ``config``: SFTConfig;
``batches``: packing and the masked loss; ``trainer``: the run (``sft(config) -> run_id``).
"""
