"""Subcommands beside training: verify, sweep, cbs, export."""
