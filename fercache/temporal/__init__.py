"""Phase 2: a temporal model (`registry`: the transformer, a TCN) trained on 64-frame clips
drawn from the feature cache."""
