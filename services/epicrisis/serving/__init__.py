"""Serving: the gRPC API, the job store and the workers that run the one pipeline."""
