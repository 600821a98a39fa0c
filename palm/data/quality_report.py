"""The quality stage's report, read without its machinery: where a stage output keeps it and what the
Pareto rule keeps at chance. `palm plan` and the data stage's accounting read it; neither needs Beam or
scikit-learn, which the stage itself (palm.data.quality) loads."""

from __future__ import annotations

import json
from typing import Any

from palm.base import storage
from palm.base.errors import PalmError
from palm.data.filters import keep_probability

#: The classifier's file in a quality stage's output: vectorizer settings, intercept and the training report.
CLASSIFIER = "classifier.json"


def chance_keep_rate(alpha: float) -> float:
    """The Pareto rule's keep rate for a score of 0.5: what a classifier that cannot tell would keep."""
    return keep_probability(0.5, alpha)


def read_report(path: str) -> dict[str, Any]:
    """The training report in a quality stage's output (local or gs://), PalmError if unreadable."""
    try:
        return json.loads(storage.read_text(storage.join(path, CLASSIFIER)))["report"]
    except FileNotFoundError:
        raise PalmError(f"quality classifier at {path}: {CLASSIFIER} is missing; rerun the quality stage "
                        "(palm run SPEC --stages quality --force)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PalmError(f"quality classifier at {path} is unreadable ({e}); rerun the quality stage "
                        "(palm run SPEC --stages quality --force)") from None
