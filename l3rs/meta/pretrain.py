"""Pretrained checkpoints θ0 (paper Appendix A): train a model on the dataset's pretrain classes and save it with its
accuracy and provenance. A checkpoint is a folder (local path or URI) holding ``variables.msgpack`` and
``meta.json`` (model, dataset, classes, steps, accuracy, seed, sha256 of the variables, versions).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from l3rs import storage

__all__ = ["PretrainResult", "pretrain", "ensure_pretrained", "save_variables", "load_variables", "random_variables"]

VARIABLES_FILE = "variables.msgpack"
META_FILE = "meta.json"


@dataclass(frozen=True)
class PretrainResult:
    variables: dict[str, Any]
    meta: dict[str, Any]


def _versions() -> dict[str, str]:
    import flax

    from l3rs._version import __version__

    return {
        "l3rs": __version__,
        "jax": jax.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
    }


def save_variables(uri: str, variables: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """Writes θ0 atomically: the variables first, then ``meta.json`` (with their sha256), which marks completion."""
    blob = serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
    meta = {**meta, "sha256": hashlib.sha256(blob).hexdigest(), "versions": _versions()}
    storage.makedirs(uri)
    storage.write_bytes_atomic(storage.join(uri, VARIABLES_FILE), blob)
    storage.write_bytes_atomic(storage.join(uri, META_FILE), json.dumps(meta, indent=2).encode())
    return meta


def load_variables(uri: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Reads θ0 and verifies its checksum. Raises ValueError with the path on a missing or corrupt checkpoint."""
    meta_uri, var_uri = storage.join(uri, META_FILE), storage.join(uri, VARIABLES_FILE)
    if not storage.exists(meta_uri) or not storage.exists(var_uri):
        raise ValueError(
            f"model.checkpoint: no pretrained checkpoint at {uri!r} (expected {META_FILE} and {VARIABLES_FILE}); "
            'make one with `l3rs pretrain --config ...` or use checkpoint = "random".'
        )
    meta = json.loads(storage.read_bytes(meta_uri))
    blob = storage.read_bytes(var_uri)
    if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise ValueError(f"model.checkpoint: {uri!r} is corrupt (sha256 of {VARIABLES_FILE} does not match).")
    return serialization.msgpack_restore(blob), meta


def random_variables(
    model_name: str, input_shape: tuple[int, int, int], num_classes: int, seed: int, *, module: Any = None
):
    """θ0 for setting E (random initialisation); ``module`` (default: the preset ``model_name``) is the model."""
    from l3rs.models import create, init_variables

    module = module if module is not None else create(model_name, num_classes=num_classes)
    return init_variables(module, jax.random.key(seed), input_shape)


def pretrain(
    *,
    dataset: Any,
    model_name: str,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    data_dir: str | None = None,
    output: str | None = None,
    progress: bool = True,
    model_options: dict[str, Any] | None = None,
    module_path: str = "",
    num_classes: int = 0,
) -> PretrainResult:
    """Trains ``model_name`` on ``dataset``'s pretrain classes with Adam (cosine decay) and reports the accuracy
    on the test split of those classes. Saves to ``output`` if given.

    ``num_classes`` > 0 keeps only the first ``num_classes`` pretrain classes (in the split's order): a narrow θ0.

    ``dataset`` is a preset name or a :class:`l3rs.data.DatasetSpec`; ``model_name`` a preset or an import path
    (with ``model_options`` and ``module_path``, as in :func:`l3rs.models.create`)."""
    from l3rs.data import get_spec, load, normalize
    from l3rs.models import create, init_variables

    spec = get_spec(dataset)
    classes = np.asarray(spec.pretrain_classes, np.int32)
    if not 0 <= num_classes <= len(classes):
        raise ValueError(f"num_classes: {spec.name}'s pretrain split has {len(classes)} classes, got {num_classes}.")
    classes = classes[:num_classes] if num_classes else classes
    remap = np.full(spec.num_classes, -1, np.int32)
    remap[classes] = np.arange(len(classes), dtype=np.int32)
    train = load(dataset, spec.train_split, data_dir=data_dir, classes=list(classes))
    test = load(dataset, spec.test_split, data_dir=data_dir, classes=list(classes))
    x_train, y_train = jax.device_put(train.images), jax.device_put(remap[train.labels])
    x_test, y_test = test.images, remap[test.labels]

    module = create(model_name, len(classes), module_path=module_path, **(model_options or {}))
    key = jax.random.key(seed)
    variables = init_variables(module, key, spec.image_shape)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = tx.init(params)

    def loss_fn(params, model_state, x, y):
        v = {"params": params, **model_state}
        if model_state:
            logits, new_state = module.apply(v, x, train=True, mutable=list(model_state))
        else:
            logits, new_state = module.apply(v, x, train=True), model_state
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_state

    # The images are an argument, not a closed-over constant: jit embeds closed-over arrays into the program (the
    # whole pretraining set as an HLO constant: gigabytes for ImageNet), and one compiled step serves any dataset of
    # the same shape (the persistent compilation cache shares it).
    @jax.jit
    def train_step(params, model_state, opt_state, key, x_train, y_train):
        idx = jax.random.randint(key, (batch_size,), 0, x_train.shape[0])
        x, y = normalize(x_train[idx]), y_train[idx]
        (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model_state, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), model_state, opt_state, loss

    @jax.jit
    def predict(params, model_state, x):
        return jnp.argmax(module.apply({"params": params, **model_state}, normalize(x), train=False), -1)

    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(range(steps), desc=f"pretrain {model_name} on {spec.name}", disable=not progress, mininterval=1.0)
    loss = jnp.nan
    for i in bar:
        key, sub = jax.random.split(key)
        params, model_state, opt_state, loss = train_step(params, model_state, opt_state, sub, x_train, y_train)
        if i % 100 == 0:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    correct = 0
    for i in range(0, len(x_test), 1000):
        correct += int(np.sum(np.asarray(predict(params, model_state, x_test[i : i + 1000])) == y_test[i : i + 1000]))
    accuracy = correct / max(len(x_test), 1)
    variables = {"params": params, **model_state}
    meta = {
        "model": model_name,
        **({"model_options": dict(model_options)} if model_options else {}),
        "dataset": spec.name,
        "pretrain_classes": [int(c) for c in classes],
        "num_classes": int(len(classes)),
        "input_shape": list(spec.image_shape),
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "final_train_loss": float(loss),
        "test_accuracy": float(accuracy),
        "train_split": spec.train_split,
        "test_split": spec.test_split,
        "seconds": round(time.perf_counter() - start, 2),
    }
    if output:
        meta = save_variables(output, variables, meta)
    return PretrainResult(variables=jax.tree.map(np.asarray, variables), meta=meta)


def ensure_pretrained(
    *, dataset: str, model_name: str, output: str, steps: int, batch_size: int, learning_rate: float, seed: int
) -> dict[str, Any] | None:
    """Pretrains into ``output`` unless a complete checkpoint (its ``meta.json``) is already there.

    Returns the new checkpoint's metadata, or None when the existing one was kept.
    """
    from l3rs import storage

    if storage.exists(storage.join(output, META_FILE)):
        return None
    result = pretrain(dataset=dataset, model_name=model_name, steps=steps, batch_size=batch_size,
                      learning_rate=learning_rate, seed=seed, output=output)  # fmt: skip
    return result.meta
