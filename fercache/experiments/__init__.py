"""Compositions of stages: the demo and its reference learners, sweeps, bagging,
subject-grouped folds, the table of runs, and `analyse` on ordinary video files."""
