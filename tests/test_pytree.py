"""jaxdiff's pytree dataclasses: every class has its own tree structure, so no jit cache mixes them up.

With jax 0.10, ``jax.tree_util.register_dataclass`` gives two different classes with the same number
of data fields and equal metadata *equal* tree structures (Euler and UniPC, DDIM and EulerAncestral,
StaticThreshold and DynamicThreshold...), and a jitted runner could then run one class's program for
the other. These tests enumerate every class jaxdiff registers (nothing hand-listed) and check the
structures, then run every sampler and guidance transform through one jitted runner in one process
and compare with each run alone in a fresh process (tests/make_pytree_identity_refs.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import pkgutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiff
from jaxdiff import _pytree, sampling
from jaxdiff import samplers as S

sys.path.insert(0, os.path.dirname(__file__))
import make_pytree_identity_refs as refs  # noqa: E402

REFS = os.path.join(os.path.dirname(__file__), "data", "pytree_identity_refs.npz")


def _import_all() -> list[type]:
    """Import every jaxdiff module; return every class defined in jaxdiff that JAX treats as a pytree node.

    Flax NNX modules are left out: NNX registers each subclass itself, with its type in the structure.
    """
    from flax import nnx

    for info in pkgutil.walk_packages(jaxdiff.__path__, "jaxdiff."):
        importlib.import_module(info.name)
    registry = jax._src.tree_util._registry  # the Python-side node registry (every register_* call)
    nodes = []
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("jaxdiff") or mod is None:
            continue
        for obj in vars(mod).values():
            if (isinstance(obj, type) and obj.__module__ == mod_name and obj in registry
                    and not issubclass(obj, nnx.Pytree)):
                nodes.append(obj)
    return nodes


def _dummy(cls: type) -> Any:
    """An instance with the class's field layout: a scalar leaf per data field, None per static field."""
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        object.__setattr__(obj, f.name, None if f.metadata.get("static", False) else 0.0)
    return obj


def _layout(cls: type) -> tuple[int, int]:
    fields = dataclasses.fields(cls)
    static = sum(bool(f.metadata.get("static", False)) for f in fields)
    return len(fields) - static, static


def _equal_structure_pairs(classes: list[type], make: Any) -> list[tuple[str, str]]:
    """Pairs of distinct classes whose instances ``make(cls)`` have equal tree structures."""
    structs = [(c.__name__, jax.tree_util.tree_structure(make(c))) for c in classes]
    return [(a, b) for (a, sa), (b, sb) in itertools.combinations(structs, 2) if sa == sb]


def _old_helper_clone(cls: type) -> type:
    """``cls``'s field layout in a fresh class registered as jaxdiff did before (``register_dataclass``)."""
    fields = dataclasses.fields(cls)
    clone = dataclasses.make_dataclass(cls.__name__, [(f.name, Any, dataclasses.field(metadata=f.metadata))
                                                      for f in fields], frozen=True)
    jax.tree_util.register_dataclass(
        clone, data_fields=[f.name for f in fields if not f.metadata.get("static", False)],
        meta_fields=[f.name for f in fields if f.metadata.get("static", False)])
    return clone


def test_every_pytree_class_comes_from_the_helper():
    nodes = _import_all()
    assert len(_pytree.CLASSES) >= 40  # samplers, transforms, denoisers, losses, models, requests, train
    outside = sorted(f"{c.__module__}.{c.__qualname__}" for c in nodes if c not in _pytree.CLASSES)
    assert not outside, f"pytree classes registered without jaxdiff._pytree.pytree_dataclass: {outside}"


def test_distinct_classes_with_equal_layouts_have_unequal_structures():
    _import_all()
    classes = list(_pytree.CLASSES)
    groups = {}
    for c in classes:
        groups.setdefault(_layout(c), []).append(c)
    assert max(len(g) for g in groups.values()) >= 5  # many classes share a layout: the check has teeth
    assert _equal_structure_pairs(classes, _dummy) == []
    # real instances too: every sampler with its defaults
    defaults = [f() for f in S.SAMPLERS.values()]
    pairs = itertools.combinations([(type(s).__name__, jax.tree_util.tree_structure(s)) for s in defaults], 2)
    assert [(a, b) for (a, sa), (b, sb) in pairs if sa == sb] == []


def test_the_old_registration_fails_the_same_check():
    """Regression: registered as before (``register_dataclass``), the same layouts compare equal."""
    _import_all()
    clones = [_old_helper_clone(c) for c in _pytree.CLASSES]
    equal = _equal_structure_pairs(clones, lambda c: c(**{f.name: None if f.metadata.get("static") else 0.0
                                                          for f in dataclasses.fields(c)}))
    for pair in [("Euler", "UniPC"), ("DDIM", "EulerAncestral"), ("StaticThreshold", "DynamicThreshold"),
                 ("DPMSolverPP2MSDE", "PredictorCorrector")]:
        assert pair in equal or pair[::-1] in equal


def test_subclass_replace_paths_and_static_fields():
    ddim, anc = S.DDIM(eta=0.3), S.EulerAncestral(eta=0.3)
    assert isinstance(anc, S.DDIM) and type(_pytree.replace(anc, eta=0.5)) is S.EulerAncestral
    assert jax.tree_util.tree_structure(ddim) != jax.tree_util.tree_structure(anc)
    assert float(dataclasses.replace(anc, eta=0.7).eta) == pytest.approx(0.7)
    assert type(jax.tree_util.tree_map(lambda v: v, anc)) is S.EulerAncestral
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(S.Heun(s_churn=1.0))[0]]
    assert paths == [(jax.tree_util.GetAttrKey(n),) for n in ("s_churn", "s_tmin", "s_tmax", "s_noise")]

    @jaxdiff.pytree_dataclass
    class Scaled:
        """A user's own denoiser: a traced scale and a static mode."""

        scale: Any
        mode: str = jaxdiff.static_field(default="mul")

        def __call__(self, x: jax.Array) -> jax.Array:
            return x * self.scale if self.mode == "mul" else x + self.scale

    traces = []

    @jax.jit
    def f(d: Scaled, x: jax.Array) -> jax.Array:
        traces.append(d.mode)
        return d(x)

    x = jnp.ones(3)
    assert float(f(Scaled(jnp.float32(2.0)), x)[0]) == 2.0
    assert float(f(Scaled(jnp.float32(5.0)), x)[0]) == 5.0  # a leaf: no new trace
    assert float(f(Scaled(jnp.float32(5.0), "add"), x)[0]) == 6.0  # a static field: a new trace
    assert traces == ["mul", "add"]
    assert jax.tree_util.tree_flatten_with_path(Scaled(1.0))[0][0][0] == (jax.tree_util.GetAttrKey("scale"),)


def test_many_field_less_classes_each_run_their_own_program():
    """Field-less classes all share one layout; with register_dataclass, ~15% of 64 ran another's program."""
    run = jax.jit(lambda d, x: d(x))
    classes = []
    for i in range(64):
        def call(self: Any, x: jax.Array, i: int = i) -> jax.Array:
            return x + i

        classes.append(jaxdiff.pytree_dataclass(type(f"Offset{i}", (), {"__call__": call})))
    x = jnp.zeros((), jnp.int32)
    wrong = [i for i, c in enumerate(classes) if int(run(c(), x)) != i]
    assert wrong == []


@pytest.fixture(scope="module")
def identity_refs() -> dict[str, np.ndarray]:
    with np.load(REFS) as z:
        return {k: z[k] for k in z.files}


def test_refs_cover_every_sampler_and_transform(identity_refs):
    _import_all()
    transforms = {c.__name__ for c in _pytree.CLASSES if c.__module__ == "jaxdiff.guidance"
                  and dataclasses.fields(c)[0].name == "inner"}
    assert set(refs.TRANSFORMS) == transforms
    assert set(refs.SAMPLER_OPTIONS) == set(S.SAMPLERS)
    assert set(identity_refs) == set(refs.CASES)


# Fresh-process references are compared with a tolerance rather than bitwise, so that another CPU's
# code generation (vector width, fused multiply-add) cannot fail the test; every two cases differ by
# at least SEPARATION, so running another case's program can never pass.
ATOL, SEPARATION = 1e-4, 1e-2


def test_cases_are_far_apart(identity_refs):
    for a, b in itertools.combinations(refs.CASES, 2):
        assert np.abs(identity_refs[a] - identity_refs[b]).max() > SEPARATION, (a, b)


def test_one_runner_in_any_order_gives_each_case_its_own_program(identity_refs):
    cases = list(refs.CASES)
    rng = np.random.default_rng(8)
    orders = [cases, cases[::-1], [cases[i] for i in rng.permutation(len(cases))]]
    before = sampling.sample_jit._cache_size()
    errors = []
    for order in orders:
        for case in order:
            out = refs.run_case(case)
            err = np.abs(out - identity_refs[case]).max()
            errors.append(err)
            assert err <= ATOL, f"{case} (order {orders.index(order)}) differs from its fresh-process run by {err}"
    # one program per case (each a distinct structure), none recompiled on later rounds
    assert sampling.sample_jit._cache_size() - before <= len(cases)
    print(f"largest difference from the fresh-process runs: {max(errors):.3g}")
