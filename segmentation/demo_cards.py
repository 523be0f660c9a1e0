"""The two demo models' cards and the training budget that meets the demo's targets.

The cards fit the synthetic inputs of :mod:`storage.samples`; ``DEMO_BUDGET``
was tuned with ``benchmarks/demo_training.py`` so that training both models
takes about two minutes on a 2-core CPU and each reaches Dice >= 0.9 per class
on held-out inputs (see that script for the measured figures).
"""

from __future__ import annotations

from dataclasses import dataclass

from segmentation.card import Architecture, InferenceDefaults, InputSpec, ModelCard, Normalization
from storage.classes import LabelClass


@dataclass(frozen=True)
class Budget:
    """What ``segmentation.training.train`` is given for one demo model."""

    steps: int
    batch_size: int
    patch: tuple[int, ...]
    lr: float


def landcover_card() -> ModelCard:
    """2-D U-Net for 4-band (blue, green, red, nir) reflectance x 10000 scenes, 5 land-cover classes."""
    return ModelCard(
        name="landcover-2d",
        description="Demo land-cover segmentation of 10 m 4-band scenes (segflow synthetic data).",
        architecture=Architecture(name="unet", kwargs={
            "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "batch"}),
        input=InputSpec(spatial_dims=2, channels=4, channel_names=["blue", "green", "red", "nir"],
                        # per-band mean and spread of valid pixels of the synthetic scenes (rounded)
                        normalization=Normalization(mode="zscore", mean=[650.0, 800.0, 750.0, 2700.0],
                                                    std=[300.0, 300.0, 450.0, 850.0]),
                        dtype="uint16", spacing=[10.0, 10.0], spacing_unit="m"),
        classes=[
            LabelClass(value=0, name="water", color=(30, 90, 200)),
            LabelClass(value=1, name="forest", color=(20, 110, 40)),
            LabelClass(value=2, name="cropland", color=(230, 200, 90)),
            LabelClass(value=3, name="road", color=(90, 90, 90)),
            LabelClass(value=4, name="built-up", color=(200, 40, 40)),
        ],
        inference=InferenceDefaults(roi=[128, 128], overlap=0.25, blend="gaussian", batch_size=8),
    )


def lesion_card() -> ModelCard:
    """3-D U-Net for single-channel MR-like volumes: background, tissue, lesion.

    Arrays are (C, z, y, x) = (C, k, j, i) of the NIfTI, so the ROI is in
    (k, j, i) order; with 1.5 mm slices it covers about 48 x 48 x 48 mm.
    """
    return ModelCard(
        name="lesion-3d",
        description="Demo brain-lesion segmentation of MR-like volumes (segflow synthetic phantoms).",
        architecture=Architecture(name="unet", kwargs={
            "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "batch"}),
        input=InputSpec(spatial_dims=3, channels=1, channel_names=["mr"],
                        normalization=Normalization(mode="image_zscore"), dtype="int16", spacing=[1.5, 1.0, 1.0],
                        spacing_unit="mm"),
        classes=[
            LabelClass(value=0, name="background", color=(0, 0, 0)),
            LabelClass(value=1, name="tissue", color=(200, 180, 160)),
            LabelClass(value=2, name="lesion", color=(230, 40, 40)),
        ],
        inference=InferenceDefaults(roi=[32, 48, 48], overlap=0.25, blend="gaussian", batch_size=4),
    )


DEMO_BUDGET: dict[str, Budget] = {
    "landcover-2d": Budget(steps=1000, batch_size=8, patch=(128, 128), lr=3e-3),
    "lesion-3d": Budget(steps=1800, batch_size=2, patch=(32, 48, 48), lr=3e-3),
}
