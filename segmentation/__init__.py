"""Models, windows, blending, stitching, training and metrics. Knows nothing of Prefect."""

from segmentation.modeldir import LoadedModel, load_model, save_model
from segmentation.predict import build_plan, predict

__all__ = ["LoadedModel", "build_plan", "load_model", "predict", "save_model"]
