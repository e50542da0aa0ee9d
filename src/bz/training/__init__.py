"""Training: the public front (:mod:`.trainer`) and the pieces of the loop behind it.

``trainer``      ``Trainer``, ``FitResult``, ``EpochRecord``: what users call
``loop``         one run of ``fit``: set-up, the epoch loop, the step, validation
``checkpoints``  when to save, what to save, resume and the final weights
``interrupts``   Ctrl-C / SIGTERM: the guard, and the vote between processes
``device``       device choice, seeding, moving and unpacking batches
``evaluate``     ``bz validate``'s single pass over the validation data

Nothing here is imported by ``import bz``; the modules import torch.
"""
