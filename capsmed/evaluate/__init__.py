"""capsmed.evaluate."""
