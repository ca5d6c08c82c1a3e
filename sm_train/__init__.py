"""SimpleMatch model and distributed training on Ray Train; consumes ``pipelines.reader``."""
