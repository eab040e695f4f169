"""The recommendation endpoint: request validation (schema), the model side (recommender), Ray Serve (app)."""
