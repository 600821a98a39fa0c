"""core: the JAX core. The model, the optimizer, sharding, the train step and loop, checkpoints, and the
language model that evaluation and generation use.

Imports jax, flax, optax, orbax and numpy, and base, spec.config and store below it: never pydantic,
Prefect or Beam (accelerator machines carry none of them).
"""
