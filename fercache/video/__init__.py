"""Video files: faces detected, tracked and aligned into the Aff-Wild2 layout
(`cropped_aligned/<video>/`, `fercache crop`), and `pyav`, the one module that reads and
writes video files (with PyAV)."""
