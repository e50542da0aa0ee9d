"""The project ``bz init`` writes (kept as real files so they are linted and type-checked)."""
