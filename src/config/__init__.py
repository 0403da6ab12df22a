"""The edge between the Hydra config and the code: validation before anything runs, and building from it."""
