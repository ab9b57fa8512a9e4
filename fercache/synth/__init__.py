"""A synthetic Aff-Wild2 tree: drawn faces in videos, EXPR/AU/VA annotations, phase-1 pools.

The tree has exactly the layout of the real data (`cropped_aligned/<video>/00001.jpg`,
`Annotations/<task>_Recognition_Challenge/<Split>_Set/<video>.txt`) plus `pools/` for the
semi-supervised phase and `synth.json`, written last, which records what was generated and
every planted quirk. The same `SynthConfig` always gives the same bytes, whatever the number
of worker processes.

Why it is hard, on purpose (so that each stage of the method has something to fix):
expressions come in segments of seconds whose intensity ramps up from near zero to an apex
(0.4..1.0) over 3-25 frames and back down at the end, so the first and last frames of a
labelled segment look almost neutral: ambiguous alone, clear in context. People talk: the mouth
opens and closes at 3-5 Hz whatever they feel, which looks like Surprise or Fear in a single
frame. Hands, bars and objects cover the mouth or eyes for 10-60 frames, and blur bursts
smear the face. Brief (2-6 frame) micro-expressions flicker towards another class while the
label stays put: a per-frame classifier flickers with them, a window vote removes them. Some
people look slightly happy, sad or cross at rest, and people blink. Head pose, scale,
lighting, colour cast, noise and JPEG quality drift smoothly through each video. The labelled
still-image pool has few identities (30), mostly frontal, clean and at apex intensity, with
AffectNet-like class shares; the unlabelled pool has many identities (300) with the full
video-like nuisance range and every intensity, so it carries variety the labelled pool lacks.

Modules, one job each: `plan` (what to generate; every video's name, split, identity and label
segments), `timeline` (one video frame by frame: expression, motion, labels), `scene` (camera,
lighting, occluders), `pools` (the still-image pools), `write` (the tree on disk, `generate`);
the faces: `face` (expression geometry, identities, nuisance), `shapes` (where the parts of a
face lie), `render` (drawing it), `landmarks` (its 68 landmarks); `streams` (seeds and random
processes). `sound` (not imported here) writes video files with a sound track and small
speech encoders, for `fercache audio`'s tests and benchmark.
"""

from fercache.synth.face import (
    Geometry,
    Identity,
    Nuisance,
    Occluder,
    expression_geometry,
    sample_identity,
)
from fercache.synth.landmarks import face_landmarks
from fercache.synth.plan import Segment, SynthConfig, VideoPlan, plan_videos
from fercache.synth.pools import plan_labelled_pool, unlabelled_truth
from fercache.synth.render import render_face, sample_background
from fercache.synth.timeline import VideoTimeline, simulate_video
from fercache.synth.write import generate

__all__ = [
    "Geometry",
    "Identity",
    "Nuisance",
    "Occluder",
    "Segment",
    "SynthConfig",
    "VideoPlan",
    "VideoTimeline",
    "expression_geometry",
    "face_landmarks",
    "generate",
    "plan_labelled_pool",
    "plan_videos",
    "render_face",
    "sample_background",
    "sample_identity",
    "simulate_video",
    "unlabelled_truth",
]
