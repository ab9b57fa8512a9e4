"""Phase 2: a temporal transformer trained on 64-frame clips drawn from the feature cache."""
