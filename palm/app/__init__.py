"""app: what a person runs. The `palm` command, the plan, the report, the console, benchmarks, the worker
entry point of launched hosts, the image builder.

May import every layer of palm; flows/ and tasks/ (Prefect) sit above it.
"""
