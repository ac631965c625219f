"""cnnlab: train, tune, track, compress and serve classic CNN image classifiers from one YAML recipe."""

import os

# Both libraries reach for the network at import time unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake in the user's input: the CLI prints the message (which says the fix), never a traceback."""


def did_you_mean(word: str, choices) -> str:
    """' Did you mean 'x' or 'y'?' for the closest choices to a mistyped word, or ''."""
    import difflib

    close = difflib.get_close_matches(word, sorted(set(choices)), n=2, cutoff=0.6)
    return f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
