"""dag: the workflow. The stage declarations (one row per stage type, naming its builder by import path
and importing none), the spec's graph resolved from them, and running it (keys, manifests, hooks).

Imports base, spec and store only: reading the table loads no engine.
"""
