"""store: the files of a run. One module owns every path under a run root (`layout`); stage outputs and
their manifests, the evaluation ledger, the run lock, TensorBoard event files.

Imports base and spec.
"""
