"""Merge kernels against plain torch math and the properties their papers promise, on small tensors."""
from __future__ import annotations

import pytest
import torch

from recipekit.ops.merge.interpolate import linear, model_stock, nearswap, slerp
from recipekit.ops.merge.task_vectors import KERNELS, task_vector_merge


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


BASE = _randn(16, 24, seed=0)
A, B = BASE + 0.1 * _randn(16, 24, seed=1), BASE + 0.1 * _randn(16, 24, seed=2)


def test_linear_is_the_weighted_mean() -> None:
    got = linear(A, B, weights=(0.25, 0.75), normalize=True)
    assert torch.allclose(got, 0.25 * A + 0.75 * B, atol=1e-6)
    assert torch.allclose(linear(A, B, weights=(1.0, 3.0), normalize=True), got, atol=1e-6)
    assert torch.allclose(linear(A, B, weights=(1.0, 3.0), normalize=False), A + 3 * B, atol=1e-6)


def test_linear_of_identical_models_is_the_model() -> None:
    assert torch.allclose(linear(A, A, A, weights=(0.2, 0.3, 0.5), normalize=True), A, atol=1e-6)


def test_slerp_ends_at_its_models_and_keeps_the_norm_between() -> None:
    assert torch.allclose(slerp(A, B, t=0.0), A, atol=1e-6)
    assert torch.allclose(slerp(A, B, t=1.0), B, atol=1e-5)
    unit_a, unit_b = A / A.norm(), B / B.norm()  # for unit vectors slerp stays on the sphere
    assert abs(float(slerp(unit_a, unit_b, t=0.3).norm()) - 1) < 1e-5


def test_slerp_of_nearly_parallel_tensors_is_linear() -> None:
    near = A * 1.5 + 1e-6
    assert torch.allclose(slerp(A, near, t=0.4), 0.6 * A + 0.4 * near, atol=1e-6)


def test_nearswap_takes_the_other_where_the_two_are_close() -> None:
    base = torch.tensor([0.0, 0.0, 0.0, 1.0])
    other = torch.tensor([0.001, 1.0, 0.0, 1.0])
    got = nearswap(base, other, t=0.01)
    assert torch.allclose(got, torch.tensor([0.001, 0.01, 0.0, 1.0]), atol=1e-7)


def test_model_stock_of_identical_models_is_the_model() -> None:
    assert torch.allclose(model_stock(A, A, A, filter_wise=False), A, atol=1e-6)
    assert torch.allclose(model_stock(BASE, A, A, filter_wise=False), A, atol=1e-5)  # cos 1: the fine-tunes' mean


def test_model_stock_follows_its_formula() -> None:
    da, db = (A - BASE).reshape(-1), (B - BASE).reshape(-1)
    cos = float(da @ db / (da.norm() * db.norm()))
    t = 2 * cos / (1 + cos)
    expected = t * (A + B) / 2 + (1 - t) * BASE
    assert torch.allclose(model_stock(BASE, A, B, filter_wise=False), expected, atol=1e-6)


def _merge(method: str, *others: torch.Tensor, **params) -> torch.Tensor:
    defaults = dict(weights=(1.0,) * len(others), densities=(1.0,) * len(others), normalize=False)
    return task_vector_merge(method, BASE, *others, **{**defaults, **params})


def test_task_arithmetic_adds_weighted_task_vectors() -> None:
    got = _merge("task_arithmetic", A, B, weights=(0.5, 2.0), lambda_=0.8)
    assert torch.allclose(got, BASE + 0.8 * (0.5 * (A - BASE) + 2.0 * (B - BASE)), atol=1e-6)


def test_ties_with_full_density_and_no_sign_conflict_is_task_arithmetic() -> None:
    up_a, up_b = BASE + (A - BASE).abs(), BASE + (B - BASE).abs()  # every task-vector entry positive
    ties = _merge("ties", up_a, up_b, weights=(0.3, 0.7), normalize=False)
    assert torch.allclose(ties, _merge("task_arithmetic", up_a, up_b, weights=(0.3, 0.7)), atol=1e-6)


def test_ties_elects_the_majority_sign_and_trims() -> None:
    base = torch.zeros(4)
    a = torch.tensor([1.0, -2.0, 0.1, 3.0])
    b = torch.tensor([2.0, 1.0, 0.2, -1.0])
    # density 0.5: a keeps -2 and 3, b keeps 2 and 1; signs: entry0 +, entry1 -2+1<0 -> -, entry3 + (3 only)
    got = task_vector_merge("ties", base, a, b, weights=(1.0, 1.0), densities=(0.5, 0.5), normalize=True)
    assert torch.allclose(got, torch.tensor([2.0, -2.0, 0.0, 3.0]))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_full_density_and_no_rescale_is_task_arithmetic(method: str) -> None:
    up_a, up_b = BASE + (A - BASE).abs(), BASE + (B - BASE).abs()
    got = _merge(method, up_a, up_b, weights=(0.3, 0.7), rescale=False, seed=3, name="w")
    assert torch.allclose(got, _merge("task_arithmetic", up_a, up_b, weights=(0.3, 0.7)), atol=1e-6)


def test_dare_keeps_about_density_and_rescales_by_either_rule() -> None:
    delta = torch.ones(200, 200)
    kept = task_vector_merge("dare_linear", torch.zeros(200, 200), delta, weights=(1.0,), densities=(0.3,),
                             normalize=False, rescale=False, seed=1, name="w")
    fraction = float((kept != 0).float().mean())
    assert abs(fraction - 0.3) < 0.02
    by_density = task_vector_merge("dare_linear", torch.zeros(200, 200), delta, weights=(1.0,), densities=(0.3,),
                                   normalize=False, rescale=True, rescale_by="density", seed=1, name="w")
    assert torch.allclose(by_density[by_density != 0], torch.full_like(by_density[by_density != 0], 1 / 0.3))
    by_l1 = task_vector_merge("dare_linear", torch.zeros(200, 200), delta, weights=(1.0,), densities=(0.3,),
                              normalize=False, rescale=True, rescale_by="l1", seed=1, name="w")
    assert abs(float(by_l1.abs().sum()) - 200 * 200) < 1e-2  # the L1 norm of the task vector is kept


def test_seeded_masks_depend_on_seed_and_name_only() -> None:
    one = _merge("dare_ties", A, B, densities=(0.5, 0.5), seed=7, name="x")
    assert torch.equal(one, _merge("dare_ties", A, B, densities=(0.5, 0.5), seed=7, name="x"))
    assert not torch.equal(one, _merge("dare_ties", A, B, densities=(0.5, 0.5), seed=8, name="x"))
    assert not torch.equal(one, _merge("dare_ties", A, B, densities=(0.5, 0.5), seed=7, name="y"))


def test_breadcrumbs_cuts_the_largest_and_the_smallest() -> None:
    base = torch.zeros(10)
    a = torch.arange(1.0, 11.0)  # magnitudes 1..10
    got = task_vector_merge("breadcrumbs", base, a, weights=(1.0,), densities=(0.5,), gammas=(0.2,),
                            normalize=False)
    assert got.tolist() == [0, 0, 0, 4, 5, 6, 7, 8, 0, 0]


def test_breadcrumbs_without_top_cut_still_keeps_the_largest() -> None:
    """mergekit's mask keeps nothing when gamma cuts no entry; here the largest `density` stay."""
    base = torch.zeros(10)
    a = torch.arange(1.0, 11.0)
    got = task_vector_merge("breadcrumbs", base, a, weights=(1.0,), densities=(0.3,), gammas=(0.0,),
                            normalize=False)
    assert got.tolist() == [0, 0, 0, 0, 0, 0, 0, 8, 9, 10]


def test_della_keeps_large_entries_more_often() -> None:
    delta = torch.arange(1.0, 1001.0).repeat(50, 1)  # every row ranks its entries the same way
    got = task_vector_merge("della_linear", torch.zeros_like(delta), delta, weights=(1.0,), densities=(0.5,),
                            epsilons=(0.4,), normalize=False, rescale=False, seed=0, name="w")
    kept = (got != 0).float().mean(dim=0)
    assert float(kept[:100].mean()) < 0.2 and float(kept[-100:].mean()) > 0.8
    assert abs(float(kept.mean()) - 0.5) < 0.02


def test_protected_entries_are_restored_from_their_input() -> None:
    a = A.clone()
    a[3, 5] = 40.0  # a super weight of model a (input 1)
    got = _merge("ties", a, B, densities=(0.1, 0.1), normalize=True, keep=((3, 5, 1),))
    assert float(got[3, 5]) == 40.0
    assert float(linear(a, B, weights=(0.5, 0.5), normalize=True, keep=((3, 5, 0),))[3, 5]) == 40.0


def test_every_task_vector_method_has_a_kernel() -> None:
    assert set(KERNELS) == {"task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                            "breadcrumbs_ties", "della", "della_linear"}


@pytest.mark.parametrize("fraction", [0.5, 0.01, 0.999])
def test_kth_largest_is_exact_through_the_sampled_bracket(monkeypatch, fraction: float) -> None:
    import recipekit.ops.merge.task_vectors as tv

    monkeypatch.setattr(tv, "SAMPLE", 1024)  # the sampled path on a small tensor
    monkeypatch.setattr(tv, "ELECT_BLOCK", 4096)  # and the bracket gathered over many blocks
    values = _randn(200_000, seed=5).abs()
    coarse = values.to(torch.bfloat16).float()  # many exact ties, as in bf16 checkpoints
    coarser = (values * 4).round() / 4  # so few values that the bracket's ends meet
    for v in (values, coarse, coarser):
        k = int(fraction * v.numel())
        assert tv.kth_largest(v, k) == torch.kthvalue(v, v.numel() - k + 1).values


@pytest.mark.parametrize("block", [64, 300, 2**22])
def test_ties_keeps_the_first_tied_entries_across_blocks(monkeypatch, block: int) -> None:
    import recipekit.ops.merge.task_vectors as tv

    monkeypatch.setattr(tv, "ELECT_BLOCK", block)
    a = torch.ones(1000)
    a[::7] = 2.0  # 143 entries above the tie; 157 of the ties make up a density of 0.3
    got = task_vector_merge("ties", torch.zeros(1000), a, weights=(1.0,), densities=(0.3,), normalize=True)
    ties_kept = ((got == 1) & (a == 1)).nonzero().view(-1)
    assert int((got != 0).sum()) == 300 and bool((got[a == 2] == 2).all())
    assert ties_kept.tolist() == (a == 1).nonzero().view(-1)[:157].tolist()  # the first in memory order


def test_ties_keeps_exactly_density_even_among_equal_magnitudes() -> None:
    base = torch.zeros(1000)
    a = torch.ones(1000)  # every magnitude ties
    got = task_vector_merge("ties", base, a, weights=(1.0,), densities=(0.3,), normalize=True)
    assert int((got != 0).sum()) == 300 and bool((got[:300] == 1).all())  # the first in memory order


def test_nuslerp_goes_from_one_model_to_the_other_by_weight() -> None:
    from recipekit.ops.merge.sphere import nuslerp

    opts = dict(nuslerp_flatten=True, nuslerp_row_wise=False)
    assert torch.allclose(nuslerp(A, B, weights=(1.0, 0.0), base=False, **opts), A, atol=1e-6)
    assert torch.allclose(nuslerp(A, B, weights=(0.0, 2.0), base=False, **opts), B, atol=1e-5)
    assert torch.allclose(nuslerp(A, B, weights=(0.6, 0.4), base=False, **opts), slerp(A, B, t=0.4), atol=1e-5)
    with_base = nuslerp(BASE, A, B, weights=(0.5, 0.5), base=True, **opts)
    assert torch.allclose(with_base, BASE + slerp(A - BASE, B - BASE, t=0.5), atol=1e-5)
    rows = nuslerp(A, B, weights=(0.5, 0.5), base=False, nuslerp_flatten=False, nuslerp_row_wise=False)
    assert torch.allclose(rows[3], slerp(A[3], B[3], t=0.5), atol=1e-5)  # each row on its own


def test_multislerp_of_identical_models_is_the_model_and_of_two_is_near_slerp() -> None:
    from recipekit.ops.merge.sphere import multislerp

    same = multislerp(A, A, A, weights=(1.0, 2.0, 3.0), normalize_weights=True, eps=1e-8, base=False)
    assert torch.allclose(same, A, atol=1e-5)
    unit_a, unit_b = A / A.norm(), B / B.norm()
    two = multislerp(unit_a, unit_b, weights=(1.0, 1.0), normalize_weights=True, eps=1e-8, base=False)
    assert torch.allclose(two, slerp(unit_a, unit_b, t=0.5), atol=1e-4)


def test_karcher_mean_of_identical_models_is_the_model_and_of_two_the_arc_midpoint() -> None:
    from recipekit.ops.merge.sphere import karcher

    assert torch.allclose(karcher(A, A, max_iter=10, tol=1e-5), A, atol=1e-5)
    unit_a, unit_b = A / A.norm(), B / B.norm()
    assert torch.allclose(karcher(unit_a, unit_b, max_iter=20, tol=1e-7), slerp(unit_a, unit_b, t=0.5), atol=1e-4)


def test_sce_of_one_model_is_that_model_and_selects_where_models_vary() -> None:
    from recipekit.ops.merge.selection import sce

    assert torch.allclose(sce(BASE, A, select_topk=1.0), A, atol=1e-6)
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 1.0, 3.0, 0.0]), torch.tensor([1.0, -1.0, -1.0, 2.0])
    # variances 0, 1, 4, 1: three entries vary, half of them (one) is kept, the one that varies most; there the
    # sum's sign is a's, and b, which disagrees, is erased
    assert torch.allclose(sce(base, a, b, select_topk=0.5), torch.tensor([0.0, 0.0, 3.0, 0.0]))


def test_ram_averages_only_over_the_models_that_changed_an_entry() -> None:
    from recipekit.ops.merge.selection import ram, ramplus_tl

    base = torch.zeros(3)
    a, b = torch.tensor([2.0, 4.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    assert ram(base, a, b, epsilon=1e-5).tolist() == [2.0, 3.0, 0.0]
    # a changed entry 0 alone and shares entry 1: rho = 1, boost 1 + 0.1 * min(1, 0.2) = 1.02
    assert torch.allclose(ramplus_tl(base, a, b, r=0.1, alpha=0.2, epsilon=1e-5), torch.tensor([2.04, 3.0, 0.0]))


def test_arcee_fusion_keeps_only_important_changes_and_follows_its_seed() -> None:
    from recipekit.ops.merge.selection import arcee_fusion

    got = arcee_fusion(BASE, A, seed=0, name="w")
    kept = got != BASE
    assert 0 < float(kept.float().mean()) < 0.5  # outliers of importance only
    assert torch.equal(got[kept], A[kept])
    assert torch.equal(got, arcee_fusion(BASE, A, seed=0, name="w"))


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_of_one_model_takes_the_shortcut_with_the_same_bits(normalize: bool) -> None:
    import recipekit.ops.merge.task_vectors as tv

    fast = task_vector_merge("ties", BASE, A, weights=(0.6,), densities=(0.5,), normalize=normalize)
    origin = BASE.float()
    trimmed = tv._magnitude(A.float() - origin, 0.5).mul_(0.6)
    tv._elect(origin, [trimmed], (0.6,), normalize=normalize, lambda_=1.0)
    assert torch.equal(fast, origin)


# --------------------------------------------------------------------------- compute dtypes


def _continuous(method: str, compute_dtype: str) -> torch.Tensor:
    """Methods without selections or draws, whose result moves smoothly with rounding."""
    from recipekit.ops.merge.sphere import karcher, multislerp, nuslerp

    c = {"compute_dtype": compute_dtype}
    return {
        "linear": lambda: linear(BASE, A, B, weights=(0.2, 0.3, 0.5), normalize=True, **c),
        "slerp": lambda: slerp(A, B, t=0.3, **c),
        "nearswap": lambda: nearswap(BASE, A, t=0.05, **c),
        "model_stock": lambda: model_stock(BASE, A, B, filter_wise=True, **c),
        "nuslerp": lambda: nuslerp(BASE, A, B, weights=(0.4, 0.6), nuslerp_flatten=False, nuslerp_row_wise=False,
                                   base=True, **c),
        "multislerp": lambda: multislerp(BASE, A, B, weights=(1.0, 2.0), normalize_weights=True, eps=1e-8,
                                         base=True, **c),
        "karcher": lambda: karcher(A, B, BASE, max_iter=10, tol=1e-5, **c),
        "task_arithmetic": lambda: _merge("task_arithmetic", A, B, weights=(0.5, 0.7), **c),
    }[method]()


@pytest.mark.parametrize("compute_dtype, eps", [("F32", 2**-23), ("BF16", 2**-8), ("F16", 2**-10)])
@pytest.mark.parametrize("method", ["linear", "slerp", "nearswap", "model_stock", "nuslerp", "multislerp", "karcher",
                                    "task_arithmetic"])
def test_a_kernel_computes_in_its_dtype_within_its_rounding(method: str, compute_dtype: str, eps: float) -> None:
    from recipekit.engine.core.kernels import torch_dtype

    got = _continuous(method, compute_dtype)
    exact = _continuous(method, "F64")
    assert got.dtype == torch_dtype(compute_dtype) and exact.dtype == torch.float64
    assert float((got.double() - exact).abs().max()) <= 16 * eps * float(exact.abs().max())


def test_linear_in_bfloat16_rounds_every_operation_to_bfloat16() -> None:
    a, b = A.bfloat16(), B.bfloat16()
    got = linear(A, B, weights=(0.3, 0.7), normalize=False, compute_dtype="BF16")
    assert torch.equal(got, torch.add(a * 0.3, b, alpha=0.7))
    assert not torch.equal(got, linear(A, B, weights=(0.3, 0.7), normalize=False).bfloat16())  # rounded once


def test_slerp_in_bfloat16_still_sees_nearly_parallel_tensors() -> None:
    """The cosine accumulates in float32, where bfloat16 could not tell 0.9995 from 1."""
    a, near = A.bfloat16(), (A * 1.5 + 1e-6).bfloat16()
    assert torch.equal(slerp(a, near, t=0.4, compute_dtype="BF16"), 0.6 * a + 0.4 * near)


@pytest.mark.parametrize("compute_dtype", ["F32", "F64", "BF16", "F16"])
def test_dare_masks_are_the_seeded_float32_draws_in_every_compute_dtype(compute_dtype: str) -> None:
    """DARE is its formula in the compute dtype, over masks drawn in float32 from the generator of (seed, tensor
    name, model) whatever that dtype; in float32 these are the bytes DARE gave before compute_dtype existed."""
    from recipekit.engine.core.kernels import generator, torch_dtype

    dtype = torch_dtype(compute_dtype)
    got = _merge("dare_linear", A, B, weights=(0.4, 0.6), densities=(0.5, 0.7), rescale=True, rescale_by="density",
                 seed=3, name="w", compute_dtype=compute_dtype)
    base = BASE.to(dtype)
    mixed = 0
    for k, (x, w, density) in enumerate(((A, 0.4, 0.5), (B, 0.6, 0.7))):
        mask = torch.rand(BASE.shape, generator=generator(3, f"w\0{k}"), dtype=torch.float32) < density
        mixed = mixed + (x.to(dtype) - base) * mask / density * w
    assert torch.equal(got, torch.add(base, mixed, alpha=1.0))


def test_ties_in_bfloat16_keeps_exactly_density_among_its_many_equal_magnitudes() -> None:
    values = torch.linspace(-1, 1, 5000)  # in bfloat16 a few hundred distinct magnitudes
    got = task_vector_merge("ties", torch.zeros(5000), values, weights=(1.0,), densities=(0.3,), normalize=True,
                            compute_dtype="BF16")
    assert int((got != 0).sum()) == 1500


def test_a_protected_entry_is_restored_exactly_when_computing_in_a_narrower_dtype() -> None:
    a = A.clone()
    a[3, 5] = 40.123456  # not a bfloat16 value
    got = linear(a, B, weights=(0.5, 0.5), normalize=True, compute_dtype="BF16", keep=((3, 5, 0),))
    assert got.dtype == torch.float32 and float(got[3, 5]) == float(a[3, 5])
    others = torch.ones_like(got, dtype=torch.bool)
    others[3, 5] = False
    assert torch.equal(got[others], got[others].bfloat16().float())  # the merged entries are bfloat16 values


def test_arcee_fusion_in_float16_measures_importance_in_float32() -> None:
    """Wide rows of large values: their softmax underflows float16, and a float16 KL divergence is nan."""
    from recipekit.ops.merge.selection import arcee_fusion

    base = _randn(8, 4096, seed=3) * 3
    other = base + 0.1 * _randn(8, 4096, seed=4)
    got = arcee_fusion(base, other, seed=0, name="w", compute_dtype="F16")
    kept = got != base.half()
    assert got.dtype == torch.float16 and 0.01 < float(kept.float().mean()) < 0.5
    assert torch.allclose(got[kept].float(), other[kept], atol=1e-2)  # base + (other - base), in float16
