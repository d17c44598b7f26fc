"""Configuration: one frozen dataclass per section (sections.py); TOML recipes and `--section.field=VALUE` overrides in, resolved TOML out (files.py)."""
