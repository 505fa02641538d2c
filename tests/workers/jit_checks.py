"""Training runs on 2 ranks with TransformerConfig.jit_layers on (tests/test_jit_layers.py): the tiny GPT of
training_checks with 2 layers and no evaluation, to keep compilation short."""
from workers.training_checks import make_config, train

STEPS = 4
DROPOUT_RECOMPUTE = dict(hidden_dropout_rate=0.1, attention_dropout_rate=0.1, recompute_granularity="full",
                         recompute_method="uniform", recompute_num_layers=1)


def config(jit: bool = False, model_options: dict = None, **layout):
    """training_checks' config with 2 layers, STEPS iterations, no evaluation; compiled layers if `jit`."""
    cfg = make_config(steps=STEPS, eval_iters=0, eval_interval=None, **layout)
    cfg.model_config.num_layers = 2
    cfg.model_config.jit_layers = jit
    for key, value in (model_options or {}).items():
        setattr(cfg.model_config, key, value)
    return cfg


def reference() -> list:
    """The single-process, eager loss curve."""
    return train(config())["loss"]


def layouts() -> dict:
    """TP=2 with sequence parallel and PP=2 with compiled layers; TP=2 with dropout and full recompute,
    eager and compiled."""
    return {"tp2_sp": train(config(True, tp=2, sp=True)),
            "pp2": train(config(True, pp=2)),
            "tp2_dropout_recompute": {"eager": train(config(False, DROPOUT_RECOMPUTE, tp=2))["loss"],
                                      "compiled": train(config(True, DROPOUT_RECOMPUTE, tp=2))["loss"]}}
