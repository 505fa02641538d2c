"""Megatron's legacy GPT (language_model -> embedding, encoder layers, output) built from parallel_core."""
from mindtron.legacy_model.attention import AttnMaskType
from mindtron.legacy_model.config import TransformerConfig, pad_vocab_size
from mindtron.legacy_model.eod_mask import EodMask, get_ltor_masks_and_position_ids
from mindtron.legacy_model.gpt_model import GPTModel, ParallelLMLogits, post_language_model_processing
from mindtron.legacy_model.language_model import TransformerLanguageModel, get_language_model
from mindtron.legacy_model.transformer import stage_layer_range
