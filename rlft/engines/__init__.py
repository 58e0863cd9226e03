"""Generation engines. Only the protocol is imported eagerly; backends import their heavy deps."""

from rlft.engines.base import Engine, Sample, SamplingParams

__all__ = ["Engine", "Sample", "SamplingParams"]
