"""Generation engines. The contracts (``base``) and the factory are imported eagerly; backends
import their heavy dependencies (torch, httpx, vLLM) only when built."""

from rlft.engines.base import (
                               ChatEngine,
                               ChatReply,
                               Engine,
                               Sample,
                               SamplingParams,
                               TrainableEngine,
                               WeightFormat,
                               WeightUpdate,
)
from rlft.engines.factory import EngineOptions, engine_options, make_engine

__all__ = ["ChatEngine", "ChatReply", "Engine", "EngineOptions", "Sample", "SamplingParams", "TrainableEngine",
           "WeightFormat", "WeightUpdate", "engine_options", "make_engine"]
