"""analysis: what a spec costs before it runs. The memory estimate, the steps compiled ahead of time for
TPU pods (libtpu), and the scaling fit over trained models.

Imports the engines below it (core) and base, spec, store.
"""
