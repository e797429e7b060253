"""Lab tooling that works from a checkout and is not installed with the library: Linux
network-namespace clusters (`netns`), the router comparison harness (`benchmark`) and the
cluster planner (`planner`). Used by `tools/` and `tests/`.
"""
