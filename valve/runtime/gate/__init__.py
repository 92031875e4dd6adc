"""The offline side of the compute gate: `Gate`/`attach` and its backends (cuda, sim; host in `offline`)."""
