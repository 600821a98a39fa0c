"""jobs: work that runs elsewhere. The launchers (local, TPU VM, GKE) and sharded evaluation jobs.

Imports the dag, the stages and everything below; never the app, flows or tasks.
"""
