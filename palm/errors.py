"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class PalmError(Exception):
    """Bad input: a spec, a data file, a checkpoint or a sample that the user must fix."""


class SpecError(PalmError):
    """A spec that cannot be run, with the file and key path that need changing."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None):
        self.file, self.key, self.detail = file, key, message
        where = ": ".join(p for p in (file, key) if p)
        super().__init__(f"{where}: {message}" if where else message)
