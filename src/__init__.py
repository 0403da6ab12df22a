"""gradflow-sweeps: see why a deep net does not train."""
