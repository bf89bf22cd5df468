"""Rollout and scoring engines: the Engine protocol (base), the embedded torch engine, the
SGLang-compatible HTTP server and client, fleets, and `build_engine` (see docs/rollout.md)."""

from rlad_megatron.engines.base import (
    Engine,
    EngineError,
    GenerateOutput,
    SamplingParams,
    ScoreOutput,
)
from rlad_megatron.engines.factory import build_engine

__all__ = ["Engine", "EngineError", "GenerateOutput", "SamplingParams", "ScoreOutput", "build_engine"]
