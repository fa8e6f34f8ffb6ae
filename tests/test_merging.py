"""Tests for nanowarp.merging: SLERP / LERP / LITI on tiny hand-checkable state dicts."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from nanowarp.merging import check_compatible, lerp, liti, slerp, slerp_pair, task_vector, task_vector_stats


def unit(deg, length=1.0):
    """A 2-D float64 vector of the given length at the given angle (degrees)."""
    r = math.radians(deg)
    return torch.tensor([math.cos(r), math.sin(r)], dtype=torch.float64) * length


def merge_delta(fn, d1, d2, lam=None, init=None):
    """The merged task vector of fn (slerp or lerp) for two task vectors of one tensor "w"."""
    init = torch.zeros_like(d1) if init is None else init
    out = fn({"w": init}, [{"w": init + d1}, {"w": init + d2}], lam)["w"]
    return out - init


@pytest.mark.parametrize("angle", [10.0, 45.0, 90.0, 135.0, 170.0])
def test_slerp_preserves_norm_of_equal_norm_task_vectors(angle):
    init = torch.tensor([0.3, -1.2], dtype=torch.float64)
    d = merge_delta(slerp, unit(0, 2.0), unit(angle, 2.0), 0.5, init)
    assert d.norm().item() == pytest.approx(2.0, rel=1e-12)  # Lemma 1
    assert torch.allclose(d, unit(angle / 2, 2.0))  # and it bisects the angle


def test_slerp_preserves_norm_of_random_tensor_task_vectors():
    torch.manual_seed(0)
    d1, d2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    d2 = d2 * d1.norm() / d2.norm()
    for lam in (0.2, 0.5, 0.9):
        assert merge_delta(slerp, d1, d2, lam).norm().item() == pytest.approx(d1.norm().item(), rel=1e-12)


@pytest.mark.parametrize("angle,lam", [(90.0, 0.5), (60.0, 0.3), (120.0, 0.5), (30.0, 0.8)])
def test_lerp_shrinks_norm(angle, lam):
    d = merge_delta(lerp, unit(0, 3.0), unit(angle, 3.0), lam)
    expected = 3.0 * math.sqrt(1 - 2 * (1 - math.cos(math.radians(angle))) * (lam - lam**2))
    assert d.norm().item() == pytest.approx(expected, rel=1e-12)


def test_lerp_at_90_degrees_keeps_0707_of_the_norm():
    d = merge_delta(lerp, unit(0, 3.0), unit(90, 3.0), 0.5)
    assert d.norm().item() == pytest.approx(3.0 * math.sqrt(0.5), rel=1e-12)


def test_lerp_default_is_uniform_average_of_task_vectors():
    ds = [unit(0), unit(90, 2.0), unit(200, 0.5)]
    out = lerp({"w": torch.zeros(2, dtype=torch.float64)}, [{"w": d} for d in ds])["w"]
    assert torch.allclose(out, sum(ds) / 3)


@pytest.mark.parametrize("name,d1,d2", [
    ("first zero", torch.zeros(3), torch.tensor([1.0, -2.0, 0.5])),
    ("second zero", torch.tensor([1.0, -2.0, 0.5]), torch.zeros(3)),
    ("parallel", torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, -6.0, 1.5])),
    ("antiparallel", torch.tensor([1.0, -2.0, 0.5]), torch.tensor([-2.0, 4.0, -1.0])),
])
def test_slerp_falls_back_to_lerp_for_degenerate_task_vectors(name, d1, d2):
    init = torch.tensor([0.5, 0.25, -1.0])
    for lam in (0.3, 0.5):
        out = slerp({"w": init}, [{"w": init + d1}, {"w": init + d2}], lam)["w"]
        assert torch.isfinite(out).all(), name
        assert torch.allclose(out, init + (1 - lam) * d1 + lam * d2, atol=1e-6), name


def test_slerp_of_two_zero_task_vectors_is_init():
    init = {"w": torch.tensor([0.5, 0.25, -1.0])}
    out = slerp(init, [dict(init), dict(init)])
    assert torch.equal(out["w"], init["w"])


def test_slerp_three_models_follows_the_paper_recursion():
    # Unit task vectors at 0°, 90°, 165°. Step 1 (λ = 1/2): Ω = 90°, both coefficients
    # sin 45°/sin 90°, giving the unit vector at 45°. Step 2 (λ = 1/3) between 45° and 165°:
    # Ω = 120°, coefficients sin(2/3·120°)/sin 120° and sin(1/3·120°)/sin 120°, giving the unit
    # vector at 45° + 120°/3 = 85°.
    init = torch.tensor([1.0, -2.0], dtype=torch.float64)
    d1, d2, d3 = unit(0), unit(90), unit(165)
    step1 = math.sin(math.radians(45)) * (d1 + d2)
    step2 = (math.sin(math.radians(80)) * step1 + math.sin(math.radians(40)) * d3) / math.sin(math.radians(120))
    out = slerp({"w": init}, [{"w": init + d} for d in (d1, d2, d3)])["w"]
    assert torch.allclose(out, init + step2, atol=1e-12)
    assert torch.allclose(out, init + unit(85), atol=1e-12)
    # Not the naive sin(Ω/M)/sin Ω on every vector (here with Ω = 90° between δ1 and δ2).
    naive = math.sin(math.radians(90 / 3)) / math.sin(math.radians(90)) * (d1 + d2 + d3)
    assert (out - init - naive).norm() > 0.1


def test_slerp_explicit_lam_with_three_models_raises():
    w = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="lam"):
        slerp(w, [w, w, w], lam=0.5)


def test_slerp_of_one_model_is_a_copy_of_it():
    init, theta = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, 2.0])}
    out = slerp(init, [theta])
    assert torch.equal(out["w"], theta["w"]) and out["w"] is not theta["w"]


def test_slerp_uses_a_separate_angle_per_tensor():
    init = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    t1 = {"a": unit(0), "b": unit(0)}
    t2 = {"a": unit(90), "b": unit(30)}
    out = slerp(init, [t1, t2], 0.5)
    coef_a = math.sin(math.radians(45)) / math.sin(math.radians(90))  # 0.7071
    coef_b = math.sin(math.radians(15)) / math.sin(math.radians(30))  # 0.5176
    assert torch.allclose(out["a"], coef_a * (t1["a"] + t2["a"]), atol=1e-12)
    assert torch.allclose(out["b"], coef_b * (t1["b"] + t2["b"]), atol=1e-12)
    assert torch.allclose(out["b"], slerp_pair(init["b"], t1["b"], t2["b"], 0.5), atol=0)


def test_untouched_tensors_and_int_buffers_pass_through_bit_exact():
    torch.manual_seed(0)
    init = {"w": torch.randn(3, 3), "frozen": torch.randn(4) * 1e3,
            "mask": torch.tril(torch.ones(3, 3, dtype=torch.bool)), "count": torch.tensor([7])}
    thetas = [{**init, "w": init["w"] + torch.randn(3, 3)} for _ in range(3)]
    for out in (slerp(init, thetas), lerp(init, thetas), liti(init, thetas[0], 0.3)):
        for k in ("frozen", "mask", "count"):
            assert torch.equal(out[k], init[k]) and out[k].dtype == init[k].dtype, k
        assert not torch.equal(out["w"], init["w"])


def test_differing_int_buffers_raise():
    init = {"count": torch.tensor([1, 2])}
    with pytest.raises(ValueError, match="count"):
        slerp(init, [init, {"count": torch.tensor([1, 3])}])


def adversarial_pairs():
    torch.manual_seed(0)
    r = torch.randn(64)
    yield "tiny", r * 1e-30, torch.randn(64) * 1e-30
    yield "subnormal", r * 1e-42, torch.randn(64) * 1e-42
    yield "huge", r * 1e30, torch.randn(64) * 1e30
    yield "near fp32 max", torch.full((8,), 3e38), torch.full((8,), -3e38)
    yield "identical", r, r.clone()
    yield "opposite", r, -r
    yield "nearly parallel", r, r + 1e-7 * torch.randn(64)
    yield "nearly opposite", r, -r + 1e-7 * torch.randn(64)
    yield "one tiny one huge", r * 1e-30, torch.randn(64) * 1e30
    for _ in range(20):
        scale = 10.0 ** torch.randint(-20, 20, (2,)).float()
        yield "random", torch.randn(64) * scale[0], torch.randn(64) * scale[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_slerp_never_emits_nan_or_inf(dtype):
    for name, t1, t2 in adversarial_pairs():
        init = torch.zeros_like(t1)
        for t in (init, t1, t2):  # clamp into the dtype's range so every input is finite
            t.clamp_(torch.finfo(dtype).min, torch.finfo(dtype).max)
        init, t1, t2 = init.to(dtype), t1.to(dtype), t2.to(dtype)
        for lam in (0.0, 0.3, 0.5, 1.0):
            out = slerp({"w": init}, [{"w": t1}, {"w": t2}], lam)["w"]
            assert out.dtype == dtype and torch.isfinite(out).all(), (name, dtype, lam)
        out = slerp({"w": init}, [{"w": t1}, {"w": t2}, {"w": -t1}])["w"]
        assert torch.isfinite(out).all(), (name, dtype, "M=3")


def test_slerp_fp16_result_keeps_dtype_and_matches_float64():
    torch.manual_seed(0)
    init, t1, t2 = (torch.randn(16) for _ in range(3))
    ref = slerp_pair(init.double(), t1.double(), t2.double(), 0.5)
    out = slerp_pair(init.half(), t1.half(), t2.half(), 0.5)
    assert out.dtype == torch.float16
    assert torch.allclose(out.double(), ref, atol=1e-2)


def test_slerp_lambda_endpoints_give_the_two_models():
    torch.manual_seed(0)
    init, t1, t2 = ({"w": torch.randn(5, 4)} for _ in range(3))
    assert torch.allclose(slerp(init, [t1, t2], 0.0)["w"], t1["w"], atol=1e-6)
    assert torch.allclose(slerp(init, [t1, t2], 1.0)["w"], t2["w"], atol=1e-6)


def test_slerp_lambda_out_of_range_raises():
    w = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="lam"):
        slerp(w, [w, w], lam=1.5)


def test_liti_end_points_are_exact():
    torch.manual_seed(0)
    a = {"w": torch.randn(6) * torch.logspace(-20, 20, 6)}
    b = {"w": torch.randn(6) * torch.logspace(20, -20, 6)}
    assert torch.equal(liti(a, b, 0.0)["w"], a["w"])
    assert torch.equal(liti(a, b, 1.0)["w"], b["w"])
    assert torch.equal(liti(a, b, 0)["w"], a["w"]) and torch.equal(liti(a, b, 1)["w"], b["w"])


def test_liti_midpoint_is_the_average():
    a, b = {"w": torch.tensor([0.0, 2.0, -4.0])}, {"w": torch.tensor([2.0, 2.0, 4.0])}
    assert torch.allclose(liti(a, b, 0.5)["w"], torch.tensor([1.0, 2.0, 0.0]))
    assert torch.allclose(liti(a, b, 0.25)["w"], torch.tensor([0.5, 2.0, -2.0]))


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_liti_invalid_eta_raises(eta):
    w = {"w": torch.zeros(2)}
    with pytest.raises(ValueError, match="eta"):
        liti(w, w, eta)


def test_check_compatible_refuses_missing_key():
    a = {"h.0.w": torch.zeros(2), "h.1.w": torch.zeros(2)}
    b = {"h.0.w": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"h\.1\.w"):
        check_compatible([a, b], ["init", "run 1"])
    with pytest.raises(ValueError, match=r"h\.1\.w"):
        check_compatible([b, a])


def test_check_compatible_refuses_wrong_shape():
    a = {"h.0.w": torch.zeros(2, 3)}
    b = {"h.0.w": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match=r"h\.0\.w.*\(2, 3\).*\(3, 2\)"):
        check_compatible([a, b])
    with pytest.raises(ValueError, match=r"h\.0\.w"):
        slerp(a, [a, b])


def test_task_vector_is_the_difference():
    init, theta = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.5, 0.0])}
    assert torch.equal(task_vector(init, theta)["w"], torch.tensor([0.5, -2.0]))


def test_slerp_saturates_instead_of_overflowing_fp16():
    # δ1 = (120000, 60000), δ2 = (120000, −60000): SLERP gives ≈ (134000, 0), past fp16's max.
    init = {"w": torch.tensor([-60000.0, 0.0], dtype=torch.float16)}
    t1 = {"w": torch.tensor([60000.0, 60000.0], dtype=torch.float16)}
    t2 = {"w": torch.tensor([60000.0, -60000.0], dtype=torch.float16)}
    out = slerp(init, [t1, t2])["w"]
    assert torch.isfinite(out).all() and out[0] == torch.finfo(torch.float16).max


def test_task_vector_stats_measure_the_angles_and_norms():
    init = {"a": torch.zeros(2), "b": torch.zeros(2)}
    runs = [{"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0])},
            {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 1.0])}]
    stats = task_vector_stats(init, runs, lerp(init, runs))
    assert stats["cos"] == pytest.approx(2 / 3)  # δ_1 = (1, 0, 1, 1), δ_2 = (0, 1, 1, 1)
    assert stats["cos_per_tensor_mean"] == pytest.approx(0.5) and stats["cos_per_tensor_median"] == pytest.approx(0.5)
    assert stats["tensors"] == 2 and stats["norm_1"] == pytest.approx(3 ** 0.5) == stats["norm_2"]
    assert stats["merge_norm_ratio"] == pytest.approx((2.5 / 3) ** 0.5)  # LERP: ‖(.5, .5, 1, 1)‖ / √3
    assert task_vector_stats(init, runs, slerp(init, runs))["merge_norm_ratio"] == pytest.approx(1.0)  # equal norms
    one = task_vector_stats(init, runs[:1], runs[0])  # one run: no angle to measure
    assert one["cos"] is None and one["cos_per_tensor_mean"] is None and one["merge_norm_ratio"] == pytest.approx(1.0)


# ---- every refusal says exactly what differs, naming the checkpoints as the caller does ----------

A, B = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
SAME = "merge only checkpoints of the same architecture"
INT = {"count": torch.tensor([1, 2])}, {"count": torch.tensor([1, 3])}


@pytest.mark.parametrize("call, message", [
    (lambda: task_vector(A, {}), f"theta has no tensor 'w' that init has; {SAME}"),
    (lambda: task_vector(A, {**B, "v": torch.ones(1)}), f"theta has tensor 'v' that init does not have; {SAME}"),
    (lambda: liti(A, {"w": torch.ones(3)}, 0.5), f"tensor 'w' has shape (2,) in theta_a but (3,) in theta_b; {SAME}"),
    (lambda: slerp(A, [B, {}]), f"model 2 has no tensor 'w' that init has; {SAME}"),
    (lambda: lerp(A, []), "need at least one fine-tuned model to merge"),
    (lambda: lerp(A, [B, B, B], 0.3), "an explicit lam is only defined for 2 models, got 3; "
                                      "leave lam unset for uniform weights"),
    (lambda: slerp(A, [B, B], 1.5), "lam must be in [0, 1], got 1.5"),
    (lambda: slerp_pair(INT[0]["count"], INT[0]["count"], INT[1]["count"], 0.5),
     "tensor 'tensor' (torch.int64) differs between checkpoints; integer/boolean buffers cannot be merged"),
    (lambda: lerp(INT[0], [INT[1]]), "tensor 'count' (torch.int64) differs between checkpoints; "
                                     "integer/boolean buffers cannot be merged"),
    (lambda: liti(INT[0], INT[1], 0.5), "tensor 'count' (torch.int64) differs between checkpoints; "
                                        "integer/boolean buffers cannot be merged"),
])
def test_every_refusal_says_exactly_what_differs(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert str(error.value) == message


def test_architectures_are_compared_field_by_field_with_every_checkpoint():
    from nanowarp.models.gpt2 import GPT2Config
    from nanowarp.models.llama_config import LlamaConfig
    names = ["init", "model 1", "model 2"]
    gpt2, llama = GPT2Config(n_layer=2), LlamaConfig(num_hidden_layers=2)
    with pytest.raises(ValueError) as error:
        check_compatible([A, A, A], names, [gpt2, gpt2, llama])
    assert str(error.value) == f"model 2 is a llama model but init a gpt2 one: {SAME}"
    with pytest.raises(ValueError) as error:
        check_compatible([A, A], names[:2], [llama, gpt2])
    assert str(error.value) == f"model 1 is a gpt2 model but init a llama one: {SAME}"
    with pytest.raises(ValueError) as error:
        check_compatible([A, A, A], names, [gpt2, gpt2, GPT2Config(n_layer=3)])
    assert str(error.value) == f"model 2 has n_layer=3 but init has n_layer=2: {SAME}"
    with pytest.raises(ValueError) as error:
        check_compatible([A, A], names[:2], [gpt2, GPT2Config(n_layer=2, eos_token_id=7)])  # the last field too
    assert str(error.value) == f"model 1 has eos_token_id=7 but init has eos_token_id=50256: {SAME}"
    # config.json as read (transformers_version and the like) is not the architecture
    check_compatible([A, A], names[:2], [llama, dataclasses.replace(llama, hf={"transformers_version": "4.0"})])


# ---- task_vector_stats against a plain float64 computation -------------------------------------

def plain_stats(init, thetas, merged):
    """The statistics task_vector_stats documents, computed the obvious way (whole flat vectors)."""
    def flat(d, keys):
        return torch.cat([d[k].double().flatten() for k in keys])

    def cos(u, v):
        return (u @ v / (u.norm() * v.norm())).item()

    keys = list(init)
    deltas = [flat(t, keys) - flat(init, keys) for t in thetas]
    pairs = [(i, j) for i in range(len(thetas)) for j in range(i + 1, len(thetas))]
    per_tensor = [cos(thetas[i][k].double().flatten() - init[k].double().flatten(),
                      thetas[j][k].double().flatten() - init[k].double().flatten())
                  for k in keys for i, j in pairs
                  if not torch.equal(thetas[i][k], init[k]) and not torch.equal(thetas[j][k], init[k])]
    norms = [d.norm().item() for d in deltas]
    return dict(cos=sum(cos(deltas[i], deltas[j]) for i, j in pairs) / len(pairs),
                cos_per_tensor_mean=sum(per_tensor) / len(per_tensor),
                cos_per_tensor_median=float(np.median(per_tensor)), tensors=len(per_tensor),
                **{f"norm_{m + 1}": n for m, n in enumerate(norms)},
                merge_norm_ratio=(flat(merged, keys) - flat(init, keys)).norm().item() / (sum(norms) / len(norms)))


def test_task_vector_stats_equal_the_plain_computation():
    # three runs, two tensors, an init away from 0, norms below 1, and a tensor one run left alone
    torch.manual_seed(0)
    init = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    runs = [{k: v + 0.1 * torch.randn_like(v) for k, v in init.items()} for _ in range(3)]
    runs[2]["b"] = init["b"].clone()
    merged = slerp(init, runs)
    stats, plain = task_vector_stats(init, runs, merged), plain_stats(init, runs, merged)
    assert stats.keys() == plain.keys() and stats["tensors"] == 3 * 2 - 2
    for key in plain:
        assert stats[key] == pytest.approx(plain[key], rel=1e-12), key


def test_task_vector_stats_without_anything_to_measure_say_none():
    init = {"a": torch.ones(2), "b": torch.ones(2)}
    moved = {"a": torch.tensor([2.0, 1.0]), "b": torch.ones(2)}
    for runs in ([moved, init], [init, moved]):  # a run that did not move, second or first: no angle with it
        one_still = task_vector_stats(init, runs, moved)
        assert one_still["cos"] is None and one_still["tensors"] == 0 and one_still["cos_per_tensor_median"] is None
        assert one_still["merge_norm_ratio"] == pytest.approx(2.0)  # ‖δ_merge‖ = 1 over the mean norm 1/2
    none_moved = task_vector_stats(init, [init, init], init)
    assert none_moved["merge_norm_ratio"] is None and none_moved["norm_1"] == 0.0


def test_liti_end_points_are_the_bits_of_the_end_point():
    # the end points are returned as they are, not through float64: a −0.0 keeps its sign
    a, b = {"w": torch.tensor([-0.0, 1.0])}, {"w": torch.tensor([1.0, 2.0])}
    assert torch.signbit(liti(a, b, 0)["w"][0]) and torch.equal(liti(a, b, 0)["w"], a["w"])
    assert torch.signbit(liti(b, a, 1)["w"][0])
