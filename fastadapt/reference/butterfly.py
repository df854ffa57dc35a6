"""Dense references: butterfly methods (filled in by its issue)."""
REFERENCES: dict = {}
