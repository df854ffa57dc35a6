"""Dense references: dora methods (filled in by its issue)."""
REFERENCES: dict = {}
