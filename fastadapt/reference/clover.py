"""Dense references: clover methods (filled in by its issue)."""
REFERENCES: dict = {}
