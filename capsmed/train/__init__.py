"""capsmed.train."""
