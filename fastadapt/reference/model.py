"""Dense references: model methods (filled in by its issue)."""
REFERENCES: dict = {}
