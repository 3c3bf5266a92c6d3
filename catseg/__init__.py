"""CAT-Seg: open-vocabulary semantic segmentation by cost aggregation (Cho et al., CVPR 2024).

Pure PyTorch + open_clip. Knows nothing of Ray.
"""

from .checkpoint import build_model, check_checkpoint, convert_official_state_dict, load_model, save_model
from .config import ModelConfig, get_config, list_models
from .finetune import configure_finetuning, optimizer_param_groups, segmentation_loss
from .model import CATSeg
from .predictor import Predictor
from .pretrained import PretrainedUnavailableError, PretrainedWeights, fetch_pretrained, list_pretrained
from .vocabulary import validate_vocabulary

__all__ = [
    "CATSeg",
    "ModelConfig",
    "Predictor",
    "PretrainedUnavailableError",
    "PretrainedWeights",
    "build_model",
    "check_checkpoint",
    "configure_finetuning",
    "convert_official_state_dict",
    "fetch_pretrained",
    "get_config",
    "list_models",
    "list_pretrained",
    "load_model",
    "optimizer_param_groups",
    "save_model",
    "segmentation_loss",
    "validate_vocabulary",
]
