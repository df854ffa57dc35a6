"""Dense references: hadamard methods (filled in by its issue)."""
REFERENCES: dict = {}
