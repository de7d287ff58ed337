"""Adapters that make serving engines use elastikv's KV cache, and the start-up hook that applies them."""
