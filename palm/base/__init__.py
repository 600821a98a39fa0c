"""base: what every layer stands on. Errors, bounded YAML, storage (local and gs://), the hardware table.

Imports the standard library and small third-party packages only; nothing of palm above it.
"""
