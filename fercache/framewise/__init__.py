"""Per-frame predictions as data: the PRED file, the ABAW metrics on per-frame arrays and the
majority vote over per-frame labels; shared by training and the prediction stages."""
