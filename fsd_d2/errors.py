"""Exceptions that carry a complete, user-actionable message (the entry point prints them without a traceback)."""
from fsd_d2.config import ConfigError
from fsd_d2.engine.checkpoint import CheckpointError

USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, KeyError)
