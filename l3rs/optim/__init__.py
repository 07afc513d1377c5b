"""The optimizer users import: L3RS as an optax transformation, its base directions, and baselines.

Depends on jax/optax/flax only; knows nothing of tasks, data or Ray.
"""

from l3rs.optim.config import VARIANTS, L3RSConfig
from l3rs.optim.directions import BUILTIN_DIRECTIONS, Direction, resolve_direction
from l3rs.optim.family import (
    FAMILIES,
    LearnedOptimizerConfig,
    family_from_dict,
    meta_size,
    meta_to_vector,
    register_family,
    vector_to_meta,
)
from l3rs.optim.fc_lopt import FCLoptConfig, FCLoptState, fc_lopt, init_fc_lopt
from l3rs.optim.l3rs import (
    L3RSState,
    Psi,
    init_psi,
    l3rs,
    layer_paths,
    layer_stats,
    psi_size,
    psi_to_vector,
    vector_to_psi,
)
from l3rs.optim.velo import VeLOConfig, VeLOState, init_velo, velo
from l3rs.optim.velo_checkpoint import load_hyper_v2, save_hyper_v2

__all__ = [
    "VeLOConfig",
    "VeLOState",
    "init_velo",
    "velo",
    "load_hyper_v2",
    "save_hyper_v2",
    "FCLoptConfig",
    "FCLoptState",
    "fc_lopt",
    "init_fc_lopt",
    "FAMILIES",
    "LearnedOptimizerConfig",
    "family_from_dict",
    "meta_size",
    "meta_to_vector",
    "register_family",
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
    "psi_size",
    "psi_to_vector",
    "resolve_direction",
    "vector_to_psi",
]

register_family(FCLoptConfig)
