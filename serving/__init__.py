"""Stage 4: the FastAPI prediction service (planned)."""
