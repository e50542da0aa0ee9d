# Minimal stubs: scikit-learn ships no type information. Only what bz's tests and
# examples use is declared; add submodules here as they are needed.
__version__: str
