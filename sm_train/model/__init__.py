"""SimpleMatch in pure PyTorch: backbones (:mod:`.backbones`, :mod:`.lora`), the upsampling decoder
(:mod:`.decoder`), sparse matching and window localization (:mod:`.matching`), the loss
(:mod:`.loss`) and the model with prediction and checkpoint I/O (:mod:`.simplematch`), all built
from one typed :class:`ModelConfig`."""

from sm_train.model.config import ModelConfig
from sm_train.model.simplematch import SimpleMatch, load_checkpoint, load_official_checkpoint, save_checkpoint

__all__ = ["ModelConfig", "SimpleMatch", "load_checkpoint", "load_official_checkpoint", "save_checkpoint"]
