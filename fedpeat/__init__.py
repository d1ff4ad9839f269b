"""fedpeat."""
