"""Dense references: lowrank methods (filled in by its issue)."""
REFERENCES: dict = {}
