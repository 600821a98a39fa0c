"""Errors a user can cause (the CLI prints them as one line and exits 2), and a requested stop (exit 75)."""


class PalmError(Exception):
    """Bad input: a spec, a data file, a checkpoint or a sample that the user must fix."""


class SpecError(PalmError):
    """A spec that cannot be run, with the file and key path that need changing."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)


class Preempted(Exception):
    """Training stopped on request (SIGTERM) after saving a checkpoint at the current step."""

    exit_code = 75  # EX_TEMPFAIL: the orchestrator retries, and the retry resumes from that checkpoint

    def __init__(self, step: int):
        super().__init__(f"preempted at step {step}; a checkpoint was saved, re-run to resume")
        self.step = step
