# Only what bz uses: the event-file reader its tests check TensorBoard output with.
# (TensorBoard ships no type information.)

__version__: str
