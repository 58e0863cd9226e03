"""Supervised finetuning data: transcripts (load, validate, render to ids + loss mask exactly as
RL rollouts render them) and trace import (normalise OpenAI / Anthropic logs into transcripts).

The trainer (``rlft sft``) lives elsewhere and consumes this API.
"""

from rlft.sft.transcripts import (
    NotPrefixStable,
    SFTExample,
    ToolCallsNotParsed,
    Transcript,
    load_transcripts,
    render_transcript,
    render_transcripts,
    write_transcripts,
)

__all__ = ["NotPrefixStable", "SFTExample", "ToolCallsNotParsed", "Transcript", "load_transcripts",
           "render_transcript", "render_transcripts", "write_transcripts"]
