"""Subcommands beside training: verify, sweep, export."""
