"""Serving engine: continuous batching over static slot caches (CUDA graphs on CUDA) for every decoding mode."""

from flarectl.engine.engine import Engine
from flarectl.engine.requests import Request, RequestResult

__all__ = ["Engine", "Request", "RequestResult"]
