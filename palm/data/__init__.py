"""The data stage: reading sources, cleaning, filtering, deduplicating and mixing documents."""

import logging

#: What `import apache_beam` logs on the root logger where Beam's gcp extra is not installed (the README's
#: first command installs no extras). Only Dataflow needs that extra, and palm names it when a spec asks
#: for Dataflow (palm.data.beam), so a local run has nothing to act on.
BEAM_WITHOUT_GCP = "apitools not found, and bigquery client libraries are not available"


def _not_beam_without_gcp(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BEAM_WITHOUT_GCP)


logging.getLogger().addFilter(_not_beam_without_gcp)  # set before any module of this package imports Beam
