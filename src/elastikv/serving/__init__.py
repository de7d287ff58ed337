"""The embedded engine and its OpenAI-compatible server."""
