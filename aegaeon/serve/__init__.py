"""Serving: the OpenAI-compatible api server, node processes and the metadata store."""
