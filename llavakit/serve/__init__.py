"""Serving: OpenAI-compatible API (+ web UI), and the LLaVA controller / model worker / web trio."""
