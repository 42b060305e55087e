"""Settings: the typed settings of inference and training, read from YAML with key=value overrides."""
