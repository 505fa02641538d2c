"""Per-document attention masks, position ids and loss masks for packed sequences (Megatron's
`get_ltor_masks_and_position_ids`), and the `EodMask` cell GPTModel uses when given an `eod` token.

A sample packs several documents separated by an end-of-document token. The token after an EOD starts a
new document: with `reset_attention_mask` it attends only within its document, with `reset_position_ids`
its positions restart at 0. The EOD token itself belongs to the document it ends.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from mindspore import Tensor, nn
import mindspore as ms


def get_ltor_masks_and_position_ids(tokens: np.ndarray, eod_token: int, reset_position_ids: bool = False,
                                    reset_attention_mask: bool = False, eod_mask_loss: bool = False
                                    ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left-to-right masks for token ids [b, s].

    Returns attention_mask bool [b or 1, 1, s, s] (True = may not attend; one shared causal mask unless
    reset_attention_mask), loss_mask float32 [b, s] (0 on EOD tokens with eod_mask_loss) and position_ids
    int32 [b, s].
    """
    tokens = np.asarray(tokens)
    b, s = tokens.shape
    allowed = np.tril(np.ones((b if reset_attention_mask else 1, 1, s, s), np.bool_))
    loss_mask = np.ones((b, s), np.float32)
    if eod_mask_loss:
        loss_mask[tokens == eod_token] = 0.0
    position_ids = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    if reset_position_ids or reset_attention_mask:
        for row in range(b):
            start = 0  # first position of the current document
            for i in np.flatnonzero(tokens[row] == eod_token):
                if reset_attention_mask:
                    allowed[row, 0, i + 1:, :i + 1] = False
                if reset_position_ids:
                    position_ids[row, i + 1:] -= i + 1 - start
                start = i + 1
    return ~allowed, loss_mask, position_ids


class EodMask(nn.Cell):
    """tokens [b, s] -> (position_ids [b, s], attention_mask [b, 1, s, s]) with one causal block per
    document (Megatron's reset_attention_mask), positions restarting per document if asked."""

    def __init__(self, eod: int, reset_position_ids: bool = False):
        super().__init__()
        self.eod, self.reset_position_ids = int(eod), reset_position_ids

    def construct(self, tokens: Tensor):
        mask, _, positions = get_ltor_masks_and_position_ids(tokens.asnumpy(), self.eod,
                                                             self.reset_position_ids, True)
        return Tensor(positions, ms.int32), Tensor(mask)
