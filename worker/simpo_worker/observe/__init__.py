"""What a run tells: log lines, metrics records, status.progress reports, profiler traces and the experiment
trackers (TensorBoard, W&B). May import parallel, store, model and contract."""
