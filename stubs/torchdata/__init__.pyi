# torchdata ships no type information; bz's tests use only its StatefulDataLoader.
