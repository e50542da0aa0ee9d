"""Training: the public front (:mod:`.trainer`) and the pieces of the loop behind it.

``trainer``      ``Trainer``, ``FitResult``, ``EpochRecord``: what users call
``loop``         one run of ``fit``: set-up, the session, the epochs and their ends
``epoch``        one epoch: the training loop, the step, validation
``control``      between optimizer steps: stop, validate, checkpoint
``precision``    autocast and the gradient scaler
``rewind``       plugin_errors: rewind (snapshots and replays)
``guards``       runs that would go wrong quietly (meta model, empty loader, NaN loss)
``checkpoint``   the checkpoint wing: files, store, lock, sharded and background writes, policy
``interrupts``   Ctrl-C / SIGTERM: the guard, and the vote between processes
``device``       device choice, seeding, moving and unpacking batches
``evaluate``     ``bz validate``'s single pass over the validation data

Nothing here is imported by ``import bz``; the modules import torch.
"""
