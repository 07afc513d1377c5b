"""NES at scale (issue 14 part 3): O(D)-memory noise, streaming tell, worker-side rebuild of a unit's candidates."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from l3rs.config import Config, ConfigError
from l3rs.meta import nes
from l3rs.service.driver import make_units
from l3rs.service.worker import unit_candidates

DIM = 1000


def _state(cfg: nes.NESConfig, generation: int = 3, seed: int = 0) -> nes.NESState:
    rng = np.random.default_rng(seed)
    state = nes.init(cfg, rng.standard_normal(DIM).astype(np.float32))
    m = (0.01 * rng.standard_normal(DIM)).astype(np.float32)
    v = (0.001 * rng.random(DIM)).astype(np.float32)
    return state._replace(m=m, v=v, generation=generation)


def _fitness(pop: int, seed: int = 1) -> np.ndarray:
    f = np.random.default_rng(seed).standard_normal(pop)
    f[3] = np.nan  # a diverged candidate
    f[4] = f[5] = -7.0  # a tied pair: diff 0, skipped by the accumulation
    return f


def _cfg(noise: str = "sequential", pop: int = 12) -> nes.NESConfig:
    return nes.NESConfig(population_size=pop, sigma=0.05, learning_rate=0.01, decay_every=7, weight_decay=0.01,
                         noise=noise)  # fmt: skip


def test_numpy_draws_the_same_stream_at_once_and_row_by_row():
    at_once = np.random.default_rng([5, 9]).standard_normal((6, DIM), dtype=np.float32)
    rng = np.random.default_rng([5, 9])
    assert np.array_equal(at_once, np.stack([rng.standard_normal(DIM, dtype=np.float32) for _ in range(6)]))


@pytest.mark.parametrize("noise", nes.NOISE_MODES)
def test_streaming_tell_equals_the_matrix_tell_bit_for_bit(noise):
    cfg = _cfg(noise)
    state = _state(cfg)
    fitness = _fitness(cfg.population_size)
    eps, candidates = nes.ask(cfg, state, seed=42)
    want, want_info = nes.tell(cfg, state, eps, fitness)
    got, got_info = nes.tell_seeded(cfg, state, 42, fitness)
    for name in ("mean", "m", "v"):
        assert getattr(got, name).tobytes() == getattr(want, name).tobytes(), name
    assert got.generation == want.generation == 4
    assert got_info == want_info
    # and the lazy candidates are ask's rows
    for i, pair in nes.iter_candidates(cfg, state, 42):
        assert pair.tobytes() == candidates[2 * i : 2 * i + 2].tobytes()


def test_table_tell_block_by_block_equals_the_matrix_tell_bit_for_bit(monkeypatch):
    monkeypatch.setattr(nes, "_TABLE_BLOCK", 96)  # several blocks, the last one short
    cfg = _cfg("table")
    state = _state(cfg)
    fitness = _fitness(cfg.population_size)
    want, _ = nes.tell(cfg, state, nes.ask(cfg, state, seed=5)[0], fitness)
    got, _ = nes.tell_seeded(cfg, state, 5, fitness)
    assert got.mean.tobytes() == want.mean.tobytes() and got.v.tobytes() == want.v.tobytes()


def test_default_mode_keeps_todays_noise_stream():
    cfg = _cfg()
    assert cfg.noise == "sequential" and Config().nes.noise == "sequential"
    state = _state(cfg, generation=2)
    eps, candidates = nes.ask(cfg, state, seed=7)
    assert eps.tobytes() == np.random.default_rng([7, 2]).standard_normal((6, DIM), dtype=np.float32).tobytes()
    scaled = np.float32(nes.sigma_at(cfg, 2)) * eps
    assert candidates[0::2].tobytes() == (state.mean + scaled).tobytes()
    assert candidates[1::2].tobytes() == (state.mean - scaled).tobytes()
    assert nes.pair_noise("sequential", 7, 2, 4, DIM).tobytes() == eps[4].tobytes()


def test_per_pair_noise_is_a_pure_function_of_seed_generation_and_pair():
    a = nes.pair_noise("per_pair", 3, 5, 17, DIM)
    assert a.dtype == np.float32 and a.shape == (DIM,)
    assert a.tobytes() == np.random.default_rng([3, 5, 17]).standard_normal(DIM, dtype=np.float32).tobytes()
    # the same in any order and whatever the population: no dependence on the other pairs
    cfg_small, cfg_big = _cfg("per_pair", pop=36), _cfg("per_pair", pop=64)
    small = nes.ask(cfg_small, _state(cfg_small, generation=5), seed=3)[0]
    big = nes.ask(cfg_big, _state(cfg_big, generation=5), seed=3)[0]
    assert small[17].tobytes() == big[17].tobytes() == a.tobytes()
    # and each coordinate changes it
    for other in ((4, 5, 17), (3, 6, 17), (3, 5, 16)):
        assert not np.array_equal(nes.pair_noise("per_pair", *other, DIM), a), other


@pytest.mark.parametrize("noise", nes.NOISE_MODES)
def test_a_worker_rebuilds_the_driver_side_candidates_from_a_unit(noise):
    cfg = _cfg(noise)
    state = _state(cfg, generation=4)
    _, candidates = nes.ask(cfg, state, seed=11)
    units = make_units(cfg, 4, 11, state.mean, task_seeds=[101, 102], costs=[3.0, 5.0])
    assert len(units) == cfg.num_pairs * 2
    for unit in units:
        g, i, j = unit.key
        assert g == 4 and unit.payload["task_seed"] == [101, 102][j] and "candidates" not in unit.payload
        rebuilt = unit_candidates(unit.payload)
        assert rebuilt.dtype == np.float32
        assert rebuilt.tobytes() == candidates[2 * i : 2 * i + 2].tobytes(), unit.key


def test_a_unit_carries_no_psi_vector():
    import pickle

    cfg = _cfg("per_pair", pop=8)
    small = make_units(cfg, 0, 1, "ref", [1], [1.0])
    assert max(len(pickle.dumps(u.payload)) for u in small) < 400  # a handle and a few numbers, not D floats


def test_table_noise_is_a_slice_of_one_seeded_table_at_a_pure_offset():
    table = nes.noise_table(3, DIM)
    assert table.size == nes.TABLE_MIN_SIZE and not table.flags.writeable
    a = nes.pair_noise("table", 3, 5, 17, DIM)
    offset = int(np.random.default_rng([3, 5, 17]).integers(0, table.size - DIM + 1))
    assert np.shares_memory(a, table) and a.tobytes() == table[offset : offset + DIM].tobytes()
    assert nes.pair_noise("table", 3, 5, 16, DIM).tobytes() != a.tobytes()
    assert nes.noise_table(4, DIM)[:DIM].tobytes() != table[:DIM].tobytes()  # another run, another table


def test_noise_mode_is_validated_by_name():
    with pytest.raises(ValueError, match=r"^noise: must be one of 'sequential', 'per_pair', 'table', got 'tabel'"):
        _cfg("tabel").validate()
    with pytest.raises(ValueError, match=r"^noise: "):
        nes.pair_noise("gaussian", 0, 0, 0, 4)
    cfg = Config()
    bad = dataclasses.replace(cfg, nes=dataclasses.replace(cfg.nes, noise="tabel"))
    with pytest.raises(
        ConfigError, match=r"^nes\.noise: must be \"sequential\", \"per_pair\" or \"table\", got 'tabel'"
    ):
        bad.validate()
    assert Config().replace({"nes.noise": "per_pair"}).nes.nes_config().noise == "per_pair"
