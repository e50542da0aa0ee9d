# Package marker for the stub of tensorboard.backend.
