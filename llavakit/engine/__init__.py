"""Generation: batched decoding with a KV cache, sampling, stop strings and streaming."""

from llavakit.engine.generate import GenerationConfig, generate_stream

__all__ = ["GenerationConfig", "generate_stream"]
