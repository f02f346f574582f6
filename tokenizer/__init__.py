"""The DAPS image tokenizer: images to discrete codes and back, Hugging Face–native.

Importing this package registers the "daps" model type with `AutoConfig`, `AutoModel` and `AutoImageProcessor`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_daps import PRESETS, DapsConfig
from .dataset_tokenization import tokenize_dataset
from .image_processing_daps import DapsImageProcessor
from .modeling_daps import DapsDecoderOutput, DapsEncoderOutput, DapsModel, DapsModelOutput, DapsPreTrainedModel

AutoConfig.register("daps", DapsConfig, exist_ok=True)
AutoModel.register(DapsConfig, DapsModel, exist_ok=True)
# Saved folders carry `auto_map` and these code files, so they load with trust_remote_code=True anywhere.
DapsConfig.register_for_auto_class()
DapsModel.register_for_auto_class("AutoModel")
AutoImageProcessor.register(DapsConfig, slow_image_processor_class=DapsImageProcessor, exist_ok=True)
DapsImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "PRESETS",
    "DapsConfig",
    "DapsModel",
    "DapsPreTrainedModel",
    "DapsEncoderOutput",
    "DapsDecoderOutput",
    "DapsModelOutput",
    "DapsImageProcessor",
    "tokenize_dataset",
]
