"""The manager: the worker registry in Redis, the embedded router and the dashboard."""
