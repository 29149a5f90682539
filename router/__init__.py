"""A routing replica: OpenAI endpoints forwarded to live workers read from the shared Redis registry."""
