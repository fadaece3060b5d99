"""Jobs: the glue between Label Studio (isal_backend.labelstudio) and the ISAL engine."""
