"""Random tiny models in the published file layouts, for tests and for development without a GPU."""
