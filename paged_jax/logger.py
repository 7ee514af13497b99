"""The package's logger: INFO lines to stderr by default, as vLLM does, so that a notebook
cell building an engine says what it is doing. PAGED_JAX_CONFIGURE_LOGGING=0 leaves logging
to the application (records then propagate to its handlers)."""

from __future__ import annotations

import logging
import os
import sys

ROOT = "paged_jax"


def configure() -> None:
    logger = logging.getLogger(ROOT)
    if os.environ.get("PAGED_JAX_CONFIGURE_LOGGING", "1") == "0" or logger.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s] %(message)s", "%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
