"""The stages that write and read PRED files: `predict`, `smooth`, `ensemble`, `evaluate`
and `submit`."""
