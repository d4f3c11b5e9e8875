"""Private machinery of the trainer hooks; no stability promise."""
