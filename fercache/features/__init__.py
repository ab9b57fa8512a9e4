"""The feature cache: per-video HDF5 stores and their manifest, written by `fercache extract`
(the frozen backbone over every frame) and `fercache import-features` (features of other
tools), with the claims that let several processes share one cache."""
