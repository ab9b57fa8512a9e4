"""The 68 iBUG 300-W landmarks of a drawn face, in pixels of the rendered image."""

import numpy as np

from fercache.synth.face import Geometry, Identity, Nuisance
from fercache.synth.shapes import (
    EYE_Y,
    HEAD_Y,
    SUPERSAMPLE,
    Projector,
    bezier,
    brow_spine,
    eye_lids,
    jaw_drop_of,
    jaw_shaped,
    lip_curves,
    nose_tip_and_wing,
    polyline,
)

_NOSE_LIFT, _MOUTH_LIFT = 0.25, 0.05  # how far the nose tip and the lips stand off the face


def face_landmarks(
    identity: Identity, geometry: Geometry, nuisance: Nuisance, size: int = 112
) -> np.ndarray:
    """The 68 (x, y) landmarks of the face `render_face` draws, in pixels of its output.

    iBUG 300-W order: jaw 0-16, brows 17-26, nose bridge 27-30 and base 31-35, eyes 36-47
    (corner, two upper-lid points, corner, two lower-lid points each), outer lips 48-59, inner
    lips 60-67; every group runs from the image's left (the subject's right). The points lie on
    the drawn shapes and go through the same head pose, so they move with pose and expression.
    """
    parts = [
        (_jaw_points(identity, geometry), np.zeros(17)),
        (_brow_points(identity, geometry), np.zeros(10)),
        _nose_points(identity, geometry),
        (_eye_points(identity, geometry), np.zeros(12)),
        (_lip_points(identity, geometry), np.full(20, _MOUTH_LIFT)),
    ]
    points = np.concatenate([points for points, _ in parts])
    lift = np.concatenate([lift for _, lift in parts])
    projector = Projector(size * SUPERSAMPLE, identity, nuisance)
    return projector.canvas_points(points, lift) / SUPERSAMPLE


def _jaw_points(identity: Identity, geometry: Geometry) -> np.ndarray:
    """17 points of the head outline from ear height on the left, round the chin, to the right."""
    angles = np.linspace(np.pi, 0.0, 17)
    radii, centre = np.array([identity.head_width, identity.head_height]), np.array([0.0, HEAD_Y])
    ellipse = polyline(np.cos(angles), np.sin(angles)) * radii + centre
    return jaw_shaped(identity, jaw_drop_of(geometry), ellipse)


def _brow_points(identity: Identity, geometry: Geometry) -> np.ndarray:
    every_other = [0, 2, 4, 6, 8]
    left = brow_spine(identity, geometry, -1)[every_other[::-1]]  # outer end first
    right = brow_spine(identity, geometry, 1)[every_other]  # inner end first
    return np.concatenate([left, right])


def _nose_points(identity: Identity, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Bridge (4, from between the eyes to the tip) and base (5, wing to wing), with lifts."""
    tip, wing = nose_tip_and_wing(identity, geometry)
    bridge = polyline(np.zeros(4), np.linspace(EYE_Y, tip, 4))
    base = bezier((-wing, tip - 0.02), (0.0, tip + 0.07), (wing, tip - 0.02), 5)
    lift = np.concatenate([np.linspace(0.1, _NOSE_LIFT, 4), np.full(5, _NOSE_LIFT)])
    return np.concatenate([bridge, base]), lift


def _eye_points(identity: Identity, geometry: Geometry) -> np.ndarray:
    corners_and_lids = np.array([-1.0, -1 / 3, 1 / 3, 1.0, 1 / 3, -1 / 3])
    on_upper = np.array([False, True, True, False, False, False])
    points = []
    for side, openness in ((-1, geometry.eye_open_left), (1, geometry.eye_open_right)):
        lids = eye_lids(identity, side, openness, geometry.cheek_raise)
        xs = lids.cx + lids.half_w * corners_and_lids
        upper = np.interp(corners_and_lids, lids.u, lids.upper)
        lower = np.interp(corners_and_lids, lids.u, lids.lower)
        points.append(polyline(xs, np.where(on_upper, upper, lower)))
    return np.concatenate(points)


def _lip_points(identity: Identity, geometry: Geometry) -> np.ndarray:
    lips = lip_curves(identity, geometry)
    outer_upper, outer_lower = np.linspace(-1, 1, 7), np.linspace(2 / 3, -2 / 3, 5)
    inner_upper, inner_lower = np.linspace(-1, 1, 5), np.array([0.5, 0.0, -0.5])

    def along(u: np.ndarray, curve: np.ndarray) -> np.ndarray:
        return polyline(np.interp(u, lips.u, lips.xs), np.interp(u, lips.u, curve))

    return np.concatenate(
        [
            along(outer_upper, lips.upper_outer),
            along(outer_lower, lips.lower_outer),
            along(inner_upper, lips.upper_inner),
            along(inner_lower, lips.lower_inner),
        ]
    )
