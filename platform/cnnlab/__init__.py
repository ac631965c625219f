"""cnnlab: train, tune, track, compress and serve classic CNN image classifiers from one YAML recipe."""

import os

# Both libraries reach for the network at import time unless told not to.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake in the user's input: the CLI prints the message (which says the fix), never a traceback."""
