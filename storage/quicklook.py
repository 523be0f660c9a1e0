"""Quicklooks: one PNG a person checks at a glance before trusting a label output.

A label map is only numbers; whether the model found the river, or put the
lesion on the wrong side, shows in a picture.  A raster quicklook draws the
classes over the scene, read at screen size from the COG's overviews, with
each class's area in hectares; a volume quicklook draws the axial, coronal and
sagittal planes through each class in the radiological convention, with each
class's volume in millilitres.  Both are cheap whatever the input's size (a
decimated read, or the few planes shown) and return a :class:`QuicklookInfo`
saying where each picture sits in the PNG and what numbers the legend shows.

The raster and volume halves live in :mod:`storage.quicklook_raster` and
:mod:`storage.quicklook_volume`; what they share (layout, legend, blending,
the PNG itself) in :mod:`storage.quicklook_canvas`.
"""

from __future__ import annotations

from storage.quicklook_canvas import ClassShown, Panel, QuicklookInfo
from storage.quicklook_raster import raster_quicklook
from storage.quicklook_volume import volume_quicklook

__all__ = ["ClassShown", "Panel", "QuicklookInfo", "raster_quicklook", "volume_quicklook"]
