"""Video files -> the Aff-Wild2 layout: faces detected, tracked and aligned into
`cropped_aligned/<video>/` (`fercache crop`)."""
