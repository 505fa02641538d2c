"""msrun worker for tests/test_convert_parallel.py: converted checkpoints loaded at their own layout.

main(cases) runs, for every case {"name", "dir", "tp", "pp", "model" (or "config_name": a tests/model_configs.py
name), "overrides": model_configs overrides (an MoE model's "moe_config" as a dict), "tokens", and optionally
"ep", "etp" (expert layout) and "save_to"}, a GPTModel of that layout loaded with mindtron's
checkpointing.load_checkpoint (the path pretrain takes) and returns the full logits [b, s, v] on the last
pipeline stage (None elsewhere), by case name; with "save_to" the loaded model is saved again there by
checkpointing.save_checkpoint (as training saves it).
"""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import mindspore as ms
from mindspore import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_fixtures import config  # noqa: E402

from mindtron.legacy_model import GPTModel  # noqa: E402
from mindtron.parallel_core import comm, parallel_state as ps, tensor_parallel as tp  # noqa: E402
from mindtron.training import checkpointing  # noqa: E402


def logits(case: dict):
    ps.initialize_model_parallel(tensor_model_parallel_size=case["tp"], pipeline_model_parallel_size=case["pp"],
                                 expert_model_parallel_size=case.get("ep", 1),
                                 expert_tensor_parallel_size=case.get("etp"))
    try:
        tp.model_parallel_seed(99)  # different from any source: only loading can make the logits right
        cfg = config(case.get("config_name", case["model"]), **case.get("overrides", {}))
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        model = GPTModel(cfg, parallel_output=False, pre_process=first, post_process=last)
        model.set_train(False)
        checkpointing.load_checkpoint(case["dir"], model, finetune=True, crc_check=True)
        if case.get("save_to"):
            checkpointing.save_checkpoint(case["save_to"], 20, model, args={"model_config": dataclasses.asdict(cfg)})
        tokens = Tensor(np.asarray(case["tokens"]), ms.int32)
        if case["pp"] == 1:
            return model(tokens).asnumpy()
        shape = (tokens.shape[1], tokens.shape[0], cfg.hidden_size)
        peer = ps.get_pipeline_model_parallel_next_rank() if first else ps.get_pipeline_model_parallel_prev_rank()
        if first:
            comm.exchange(model(tokens), peer, None)
            return None
        model.set_input_tensor(comm.exchange(None, peer, shape))
        return model(None).asnumpy()
    finally:
        ps.destroy_model_parallel()


def main(cases: list) -> dict:
    return {case["name"]: logits(case) for case in cases}
