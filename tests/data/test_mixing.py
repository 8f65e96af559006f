"""FDC mixing: counts follow the ratios, sampling is stratified, deterministic and never silent."""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from equilibrate_pl.data.mixing import DEFAULT_RATIOS, MixWarning, mix, naive, naive_base

GROUPS = ("EHD", "IHD", "MHD")


def make_pools(n_general: int, sizes: dict[str, int]) -> tuple[list[dict], list[dict]]:
    general = [{"id": f"g{i}", "prompt": f"general {i}", "group": "general"} for i in range(n_general)]
    safety = [
        {"id": f"{g}{i}", "prompt": f"{g} prompt {i}", "group": g} for g in GROUPS for i in range(sizes.get(g, 0))
    ]
    return general, safety


def ids(result) -> list[str]:
    return [r["id"] for r in result.records]


pool_sizes = st.fixed_dictionaries({g: st.integers(0, 40) for g in GROUPS})
ratio_values = st.fixed_dictionaries({g: st.floats(1.0, 200.0, allow_nan=False) for g in GROUPS})


def test_hand_checked_default_ratios():
    # 3000 general rows at the paper's 1:25 / 1:75 / 1:150 -> 120 EHD, 40 IHD, 20 MHD.
    general, safety = make_pools(3000, {"EHD": 500, "IHD": 500, "MHD": 500})
    res = mix(general, safety, mode="ratio", seed=0)
    assert res.counts == {"general": 3000, "EHD": 120, "IHD": 40, "MHD": 20}
    assert res.requested == {"general": 3000, "EHD": 120, "IHD": 40, "MHD": 20}
    assert res.notes == []


def test_half_rounds_up_not_to_even():
    # 50 / 20 = 2.5 -> 3 (round() would give 2); 70 / 20 = 3.5 -> 4.
    general, safety = make_pools(50, {"EHD": 10})
    assert mix(general, safety, ratios={"EHD": 20}).counts["EHD"] == 3
    general, safety = make_pools(70, {"EHD": 10})
    assert mix(general, safety, ratios={"EHD": 20}).counts["EHD"] == 4


@settings(max_examples=60, deadline=None)
@given(n_general=st.integers(0, 600), sizes=pool_sizes, ratios=ratio_values, seed=st.integers(0, 2**16))
def test_ratio_counts_match_within_rounding(n_general, sizes, ratios, seed):
    general, safety = make_pools(n_general, sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixWarning)
        res = mix(general, safety, mode="ratio", ratios=ratios, seed=seed)
    for g in GROUPS:
        target = n_general / ratios[g]
        if sizes[g] >= target + 0.5:
            assert abs(res.counts.get(g, 0) - target) <= 0.5
        else:  # short group: all of it, and the shortfall is written down
            assert res.counts.get(g, 0) == min(sizes[g], res.requested[g])
            if res.requested[g] > sizes[g]:
                assert any(n.startswith(f"{g}:") and "shortfall" in n for n in res.notes)
    assert res.counts.get("general", 0) == n_general


@settings(max_examples=40, deadline=None)
@given(n_general=st.integers(0, 300), sizes=pool_sizes, ratios=ratio_values, seed=st.integers(0, 2**16))
def test_same_seed_same_order_and_no_duplicates(n_general, sizes, ratios, seed):
    general, safety = make_pools(n_general, sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixWarning)
        a = mix(general, safety, ratios=ratios, seed=seed)
        b = mix(list(general), list(safety), ratios=ratios, seed=seed)
    assert ids(a) == ids(b)
    assert len(set(ids(a))) == len(ids(a))  # without replacement nothing repeats
    # Multiset: every general row exactly once, every safety row drawn from its own group's pool.
    by_id = {r["id"]: r for r in general + safety}
    assert Counter(r["group"] for r in a.records if r["id"].startswith("g")) == Counter({"general": n_general} if n_general else {})
    for r in a.records:
        assert by_id[r["id"]] is r


@settings(max_examples=30, deadline=None)
@given(sizes=st.fixed_dictionaries({g: st.integers(12, 40) for g in GROUPS}), seeds=st.tuples(st.integers(0, 999), st.integers(1000, 1999)))
def test_different_seeds_differ(sizes, seeds):
    general, safety = make_pools(200, sizes)
    # 200/25 = 8 of at least 12 EHD rows: many possible draws, and the order is shuffled too.
    a = mix(general, safety, ratios={"EHD": 25}, seed=seeds[0])
    b = mix(general, safety, ratios={"EHD": 25}, seed=seeds[1])
    assert ids(a) != ids(b)


@settings(max_examples=30, deadline=None)
@given(sizes=pool_sizes, quotas=st.fixed_dictionaries({g: st.integers(0, 60) for g in GROUPS}), seed=st.integers(0, 99))
def test_replacement_upsamples_only_short_groups(sizes, quotas, seed):
    general, safety = make_pools(10, sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixWarning)
        res = mix(general, safety, mode="quota", quotas=quotas, replacement=True, seed=seed)
    per_group = Counter(r["id"] for r in res.records)
    for g in GROUPS:
        drawn = [r for r in res.records if r["group"] == g]
        if sizes[g] == 0:
            assert drawn == []
            continue
        assert len(drawn) == quotas[g]
        group_ids = {f"{g}{i}" for i in range(sizes[g])}
        assert {r["id"] for r in drawn} <= group_ids
        if quotas[g] >= sizes[g]:  # upsampled: every row at least once
            assert {r["id"] for r in drawn} == group_ids
        else:  # enough rows: still no repeats
            assert all(per_group[r["id"]] == 1 for r in drawn)


def test_shortfall_warns_and_is_recorded():
    general, safety = make_pools(10, {"EHD": 2, "IHD": 5, "MHD": 0})
    with pytest.warns(MixWarning) as caught:
        res = mix(general, safety, mode="quota", quotas={"EHD": 5, "IHD": 3, "MHD": 1})
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2
    assert messages[0].startswith("EHD: requested 5 rows but only 2") and messages[1].startswith("MHD: requested 1")
    assert res.counts == {"general": 10, "EHD": 2, "IHD": 3}
    assert res.requested["EHD"] == 5 and res.available["EHD"] == 2
    assert any("MHD" in n and "none" not in n for n in res.notes)
    assert "EHD" in res.table() and "share" in res.table()


def test_general_labelled_safety_rows_are_reported_not_mixed():
    general, safety = make_pools(100, {"EHD": 10})
    safety.append({"id": "lookalike", "prompt": "how do I kill a python process", "group": "general"})
    res = mix(general, safety, ratios={"EHD": 25})
    assert "lookalike" not in ids(res)
    assert any("labelled 'general' not mixed" in n for n in res.notes)
    everything = mix(general, safety, mode="all")
    assert Counter(ids(everything)) == Counter(r["id"] for r in general + safety)


def test_groups_are_sampled_independently():
    # Changing the EHD amount must not change which IHD rows are picked (per-group streams).
    general, safety = make_pools(1500, {"EHD": 200, "IHD": 200, "MHD": 200})
    a = mix(general, safety, ratios={"EHD": 25, "IHD": 75})
    b = mix(general, safety, ratios={"EHD": 10, "IHD": 75})
    assert {r["id"] for r in a.records if r["group"] == "IHD"} == {r["id"] for r in b.records if r["group"] == "IHD"}


def test_unknown_group_and_bad_ratio_raise():
    general, safety = make_pools(10, {"EHD": 1})
    with pytest.raises(ValueError, match="unknown group"):
        mix(general, safety + [{"id": "x", "group": "violent"}])
    with pytest.raises(ValueError, match="must be > 0"):
        mix(general, safety, ratios={"EHD": 0})
    with pytest.raises(ValueError, match="not a safety group"):
        mix(general, safety, ratios={"general": 3})


@settings(max_examples=30, deadline=None)
@given(n_general=st.integers(0, 3000), scale=st.floats(0, 5), seed=st.integers(0, 99))
def test_naive_draws_scale_times_the_fdc_budget(n_general, scale, seed):
    general, safety = make_pools(n_general, {"EHD": 30, "IHD": 30, "MHD": 30})
    safety.append({"id": "unlabelled", "prompt": "?"})  # unsorted data may carry no group
    base = sum(n_general / DEFAULT_RATIOS[g] for g in GROUPS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixWarning)
        res = naive(general, safety, scale=scale, seed=seed)
        again = naive(general, safety, scale=scale, seed=seed)
    drawn = [r for r in res.records if not r["id"].startswith("g")]
    assert abs(naive_base(n_general) - base) <= 1.5  # three groups, each rounded by at most 0.5
    assert len(drawn) == min(len(safety), int(scale * naive_base(n_general) + 0.5))
    assert len({r["id"] for r in drawn}) == len(drawn)
    assert ids(res) == ids(again)


def test_sorted_takes_every_harmful_row_and_leaves_cleared_lookalikes_out():
    general, safety = make_pools(10, {"EHD": 4, "IHD": 3, "MHD": 2})
    cleared = [{"id": f"look{i}", "prompt": f"kill a zombie process {i}", "group": "general"} for i in range(5)]
    res = mix(general, safety + cleared, mode="sorted", seed=0)
    assert res.counts == {"general": 10, "EHD": 4, "IHD": 3, "MHD": 2}
    assert not any(i.startswith("look") for i in ids(res))
    assert res.notes == ["5 safety rows labelled 'general' not mixed: mode 'sorted' takes the harmful groups ['EHD', 'IHD', 'MHD']"]
    kept_all = mix(general, safety + cleared, mode="all", seed=0)  # 'all' keeps them, as documented
    assert sum(i.startswith("look") for i in ids(kept_all)) == 5
