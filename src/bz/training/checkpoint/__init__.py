"""The checkpoint wing: files, the store, the run's lock, sharded and background writes, policy.

``files``       the file format: run signature, payload types, names, sidecars, reading
``store``       atomic verified writes, pruning, ``CheckpointStore``
``lock``        one writer per run: the OS lock on a run's checkpoint folder
``sharded``     sharded checkpoints (a DCP folder per checkpoint, under ``fsdp``)
``background``  ``checkpoint_async``: one background write at a time
``policy``      when and what to save, finding and resuming, the final weights
``writes``      one write: now or in the background, and its report

Only training and ``bz validate`` use it; nothing here is public.
"""
