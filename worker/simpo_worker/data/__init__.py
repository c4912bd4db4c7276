"""Text in: the tokenizer and chat template, preference pairs and prompts from JSONL / Parquet rows, and the
generated preference set. May import weights (the GGUF vocabulary), parallel, store, model and contract."""
