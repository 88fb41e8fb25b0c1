"""Model kinds behind one interface (see base.Model): 'sim' and 'ami'."""

from __future__ import annotations

from antenna_flows.models.base import ImageInput, Model, UnknownPipeline
from antenna_flows.settings import WorkerSettings


def load_model(settings: WorkerSettings) -> Model:
    """Build the model kind the settings ask for (imports torch only for 'ami')."""
    if settings.model_kind == "sim":
        from antenna_flows.models.sim import SimModel

        return SimModel(settings.sim_seconds_per_image, settings.sim_seconds_per_batch)
    import torch

    from antenna_flows.models.ami import AmiModel  # noqa: PLC0415 - torch is heavy

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    return AmiModel.from_settings(settings)


__all__ = ["ImageInput", "Model", "UnknownPipeline", "load_model"]
