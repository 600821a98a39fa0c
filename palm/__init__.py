"""palm-pipeline: PaLM pretraining as a configuration-driven workflow."""

__version__ = "0.1.0"


def version_info() -> dict:
    """The package version and the commit the code was built from: `git` when running from a checkout
    (with `dirty` when tracked files differ from that commit), else PALM_COMMIT (set in the worker image
    by `palm image`, which passes it as a build argument), else "unknown"."""
    import os
    import subprocess
    from pathlib import Path

    info = {"version": __version__, "commit": "unknown", "dirty": None, "source": "unknown"}
    repo = Path(__file__).resolve().parent.parent
    if (repo / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10, check=True).stdout.strip()
            status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=True).stdout
            return {**info, "commit": commit, "dirty": bool(status.strip()), "source": "git"}
        except (OSError, subprocess.SubprocessError):
            pass
    if os.environ.get("PALM_COMMIT", "unknown") != "unknown":
        return {**info, "commit": os.environ["PALM_COMMIT"], "source": "image"}
    return info


def version_line() -> str:
    info = version_info()
    dirty = " with uncommitted changes" if info["dirty"] else ""
    return f"palm-pipeline {info['version']} (commit {info['commit']}{dirty})"
