"""The attention's three formulations (whole matrix, blocked on CPU, the backend's fused op) agree."""

import keras
import numpy as np
import pytest

from kerasdiffusion.layers import ScaledDotProductAttention


def reference(q, k, v, heads, causal):
    """float64 NumPy attention over ``[B, N, C]``."""
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(0, 2, 1, 3).astype("float64")  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])
    if causal:
        scores = np.where(np.tril(np.ones(scores.shape[-2:], bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    out = (weights / weights.sum(-1, keepdims=True)) @ v
    return out.transpose(0, 2, 1, 3).reshape(q.shape[0], q.shape[2], -1)


@pytest.fixture
def formulation(monkeypatch):
    def use(name):
        monkeypatch.setattr(ScaledDotProductAttention, "fused", name == "fused")
        # 2 x 4 x 300 x 300 scores: blocks of 4096 numbers loop over 22 blocks per head; 0 builds the whole matrix.
        monkeypatch.setattr(ScaledDotProductAttention, "block_scores", 4096 if name == "blocked" else 0)
    return use


# Causal attention (the text encoder's) always builds the whole matrix, so "blocked" is not a causal case.
@pytest.mark.parametrize("name, causal", [("whole", False), ("blocked", False), ("fused", False),
                                          ("whole", True), ("fused", True)])
def test_formulations_match_float64(formulation, name, causal):
    formulation(name)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 300, 64)).astype("float32") for _ in range(3))
    layer = ScaledDotProductAttention(4, causal=causal)
    if name == "blocked":
        assert layer._blocked(*(layer._split_heads(keras.ops.convert_to_tensor(t)) for t in (q, k)))
    out = keras.ops.convert_to_numpy(layer([q, k, v]))
    np.testing.assert_allclose(out, reference(q, k, v, 4, causal), atol=2e-5, rtol=1e-4)


def test_fused_with_upcast_under_float16(formulation):
    """SD 2.x's upcast: under mixed_float16 the fused op still computes in float32."""
    formulation("fused")
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 64, 32)).astype("float32") for _ in range(3))
    layer = ScaledDotProductAttention(2, upcast=True, dtype="mixed_float16")
    out = keras.ops.convert_to_numpy(layer([q.astype("float16"), k.astype("float16"), v.astype("float16")]))
    assert out.dtype == np.float16
    np.testing.assert_allclose(out.astype("float32"), reference(q, k, v, 2, False), atol=5e-3)
