"""Deployment of SOLO models: an exportable wrapper with the deploy contract
(:class:`SOLODeployModel`), export to ONNX and ``torch.export`` (:mod:`.exporter`), and the
exported models as Detectron2 models for evaluation (:mod:`.runtime`)."""
from .deploy_model import SOLODeployModel

__all__ = ["SOLODeployModel"]
