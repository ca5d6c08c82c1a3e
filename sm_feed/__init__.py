"""The feed: pairs from shards (:mod:`pipelines.reader`) to batches of network inputs on the
device, in the model's input (:class:`sm_model.inputs.InputSpec`). Training and evaluation both
read their pairs through :mod:`sm_feed.batches`: pieces of shards, loader processes that decode
and resize each image once, batches assembled in order, pinned side-stream copies to a GPU.

It sits above both the data pipeline and the model package, which know nothing of each other."""
