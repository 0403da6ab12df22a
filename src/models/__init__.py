"""Models: the registry of activations, inits and optimizers, the MLP builder, the LightningModules."""
