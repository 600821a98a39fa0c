#!/bin/sh
# The worker image's entrypoint (infra/Dockerfile). A Beam runner starts an SDK harness container with
# flags only (--id=…, --logging_endpoint=…, --provision_endpoint=…, or --worker_pool): those go to Beam's
# boot program, which starts the Python SDK worker with the interpreter on PATH. Anything else is a
# command (`palm worker …`, `palm --help`), run as given.
case "$1" in
  --*) exec /opt/apache/beam/boot "$@" ;;
  *) exec "$@" ;;
esac
