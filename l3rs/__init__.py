"""l3rs: learned layer-wise optimizers (L3RS) for fine-tuning pretrained models, meta-trained with NES on Ray.

The public API lives here; everything else may change.

    import l3rs
    config = l3rs.L3RSConfig()
    psi = l3rs.init_psi(config, params, jax.random.key(0))
    tx = l3rs.l3rs(psi, config, total_steps=500)       # or: tx = l3rs.load("runs/NAME/psi", total_steps=500)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, value=loss)

Meta-training for your own domain (model, dataset, θ0) from Python, as the CLI does it:

    cfg = l3rs.Config.from_toml("my_domain.toml").replace({"nes.generations": 50})
    run = l3rs.train(cfg)                      # run.psi_uri, run.history
    res = l3rs.evaluate(cfg, psi=run.psi_uri)  # res.rows, res.summary
"""

from l3rs._version import __version__ as __version__
from l3rs.api import EvaluationResult, evaluate, pretrain, train
from l3rs.artifact import load, load_psi
from l3rs.config import Config, ConfigError
from l3rs.optim import (
    BUILTIN_DIRECTIONS,
    FAMILIES,
    VARIANTS,
    Direction,
    FCLoptConfig,
    FCLoptState,
    L3RSConfig,
    L3RSState,
    Psi,
    VeLOConfig,
    VeLOState,
    fc_lopt,
    init_fc_lopt,
    init_psi,
    init_velo,
    l3rs,
    layer_paths,
    layer_stats,
    load_hyper_v2,
    meta_to_vector,
    psi_size,
    psi_to_vector,
    save_hyper_v2,
    vector_to_meta,
    vector_to_psi,
    velo,
)

__all__ = [
    "Config",
    "ConfigError",
    "EvaluationResult",
    "evaluate",
    "pretrain",
    "train",
    "VeLOConfig",
    "VeLOState",
    "init_velo",
    "velo",
    "load_hyper_v2",
    "save_hyper_v2",
    "FAMILIES",
    "FCLoptConfig",
    "FCLoptState",
    "fc_lopt",
    "init_fc_lopt",
    "meta_to_vector",
    "vector_to_meta",
    "BUILTIN_DIRECTIONS",
    "VARIANTS",
    "Direction",
    "L3RSConfig",
    "L3RSState",
    "Psi",
    "init_psi",
    "l3rs",
    "layer_paths",
    "layer_stats",
    "load",
    "load_psi",
    "psi_size",
    "psi_to_vector",
    "vector_to_psi",
]
