"""Stage 4: the FastAPI prediction service (`python -m serving`): top-k, fc7 embeddings and
retrieval from a trained checkpoint, with bounded work, streamed upload limits and bearer auth."""
