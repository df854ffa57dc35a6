"""Dense references: cayley methods (filled in by its issue)."""
REFERENCES: dict = {}
