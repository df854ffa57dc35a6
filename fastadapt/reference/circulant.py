"""Dense references: circulant methods (filled in by its issue)."""
REFERENCES: dict = {}
