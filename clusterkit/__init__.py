"""What the cluster's processes share: OpenAI's error shape, raw-ASGI helpers, bearer-key checks,
CLI and config plumbing, and the registry's wire schema and Redis layout.

It imports none of ``engine``, ``worker``, ``router`` or ``manager`` (checked by import-linter), so
every process can use it without loading anything heavy.
"""
