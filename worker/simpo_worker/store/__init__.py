"""Files: fsspec storage (local or gs://: atomic writes, retries) and the output directory's layout.
May import contract only."""
