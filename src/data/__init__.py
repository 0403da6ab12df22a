"""The offline datasets and the LightningDataModule that serves them."""
