"""The training videos a run uses: all of them, or a seeded fraction (the `subsample` setting).

Bagging (the LSD paper) trains several models on different subsamples of the videos and soft-votes
them; whole videos are drawn, not frames, so each model still sees complete temporal context.
The draw depends only on the run's seed and the sorted video names, so a resumed run or a rerun
trains on exactly the same videos.
"""

from dataclasses import replace

import numpy as np

from fercache.data.labels import SplitLabels

SUBSAMPLE_STREAM = 7  # keeps this draw independent of the window and dropout streams of the seed


def subsample_videos(split: SplitLabels, fraction: float, seed: int) -> SplitLabels:
    """`split` with round(fraction x videos) of its videos (at least one), in their order."""
    if fraction >= 1 or not split.videos:
        return split
    count = max(1, round(fraction * len(split.videos)))
    rng = np.random.default_rng([seed, SUBSAMPLE_STREAM])
    chosen = np.sort(rng.choice(len(split.videos), size=count, replace=False))
    return replace(split, videos=[split.videos[index] for index in chosen])
