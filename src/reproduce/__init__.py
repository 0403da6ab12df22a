"""The presets' studies reproduced: what each seed or paper reported (studies, columns), running a study and
reading it back from MLflow (runner), and the tables it leaves (results). `python -m src.reproduce`."""
