"""The router: many models behind one OpenAI endpoint (``elastikv serve``)."""
