"""spec: what a user writes. The JAX core's configuration (plain dataclasses, `config`), the pydantic
schema of a whole pipeline (`schema`) and reading it from YAML with `extends` and `--set` (`loading`).

Imports base only. `config` imports nothing but the standard library, so the JAX core can use it
without pydantic.
"""
