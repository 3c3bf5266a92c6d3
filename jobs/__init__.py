"""Entry points for `ray job submit -- python -m jobs.<name> ...` (also run locally on an embedded Ray)."""
