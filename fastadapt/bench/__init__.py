"""fastadapt.bench: timing, saved-activation bytes, peak memory, error vs float64 reference."""
