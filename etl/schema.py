"""Kept importable for the modules not moved yet: the tables live in `etl.store.schema`."""

from etl.store.schema import *  # noqa: F403
