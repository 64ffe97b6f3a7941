"""`aegaeon simulate` and `aegaeon plan` (filled in by the simulator work)."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the simulator's subcommands on the `aegaeon` parser."""
