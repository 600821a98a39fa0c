"""Benchmarks, one module per `palm bench` subcommand: train (the jitted train step), data (the data stage
against datatrove, on the corpus of corpus.py), input (tokenize-and-pack and the loader), decode (the KV-cache
decode step against the bandwidth roofline) and generate (lm-eval generate_until, batched against one at a
time); common holds what several of them use."""
