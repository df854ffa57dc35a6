"""Dense references: structured (sparse, shared, diagonal) updates (filled in by its issue)."""
REFERENCES: dict = {}
