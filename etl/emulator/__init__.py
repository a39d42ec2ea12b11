"""A local emulator of Anthropic's Message Batches API, driven by the real SDK in tests.

See docs/emulator.md. Public entry points: :class:`EmulatorServer`, :class:`EmulatorConfig`,
:class:`EmulatorControl` and the fake model's functions in :mod:`etl.emulator.model`.
"""

from etl.emulator.control import EmulatorControl
from etl.emulator.server import EmulatorConfig, EmulatorServer

__all__ = ["EmulatorConfig", "EmulatorControl", "EmulatorServer"]
