"""The Hydra config tree (train.yaml is the root). A package only so that a non-editable install (the worker
image) puts it beside src/, where src/train.py looks for it (config_path="../conf")."""
