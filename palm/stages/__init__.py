"""stages: one builder module per stage type, named in the stage table (palm.dag.table).

A builder takes (the node's spec, its inputs, hooks) and returns build(dir) -> the manifest's fields. It
calls the engines below it; it never imports the table, the runner's callers, jobs or the app.
"""
