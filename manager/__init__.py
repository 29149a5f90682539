"""Manager process (arrives with its own issue; see ../shared/SPEC.md)."""
