"""Data on disk: IDX files, the fetch sources, processed splits and their
manifest, the model file, and atomic writes for all of them."""
