"""Tests of sim.populations: synthetic and benchmark generators, the CSV loader, CLI specs."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from sim import populations as pop
from sim.populations import (
    AGE_GROUPS,
    SYNTHETIC_LAYER_WEIGHTS,
    ContactLayer,
    Population,
    PopulationError,
    PopulationFileError,
    PopulationSpecError,
)

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def edge_keys(layer: ContactLayer, n: int) -> np.ndarray:
    """``dst * n + src`` per edge, in stored order."""
    return (layer.dst * n + layer.src).numpy()


def assert_symmetric_sorted(layer: ContactLayer, n: int) -> None:
    """Sorted by (dst, src), no duplicates, no self-loops, both directions of every contact."""
    assert layer.src.dtype == torch.int64
    assert layer.dst.dtype == torch.int64
    assert layer.weight.dtype == torch.float32
    assert layer.src.shape == layer.dst.shape == layer.weight.shape
    if layer.n_edges == 0:
        return
    assert int(layer.src.min()) >= 0 and int(layer.src.max()) < n
    assert int(layer.dst.min()) >= 0 and int(layer.dst.max()) < n
    assert not bool((layer.src == layer.dst).any()), "self-loop"
    keys = edge_keys(layer, n)
    assert np.all(np.diff(keys) > 0), "not strictly sorted by (dst, src)"
    reverse = np.sort((layer.src * n + layer.dst).numpy())
    np.testing.assert_array_equal(keys, reverse)  # every (a, b) has its (b, a)


def write_population(directory: Path, agents: str | None, **layers: str) -> Path:
    """Write ``agents.csv`` (unless None) and ``<name>.csv`` for each layer into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    if agents is not None:
        (directory / "agents.csv").write_text(agents)
    for name, text in layers.items():
        (directory / f"{name}.csv").write_text(text)
    return directory


GOOD_AGENTS = (
    "agent_id,age_group,gender,initially_infected\n"
    "2,65A,female,1\n"
    "0,U19,male,0\n"
    "1,30t39,female,0\n"
    "3,20t29,male,0\n"
)
# a repeated contact in reverse orientation and a self-loop
GOOD_CONTACTS_0 = "src,dst\n0,1\n1,0\n2,2\n3,1\n"
# weighted: 0-2 appears twice (weights 0.5 and 2.0 → merged to the largest)
GOOD_CONTACTS_1 = "src,dst,weight\n0,2,0.5\n2,0,2.0\n3,0,1.25\n"


def good_dir(tmp_path: Path) -> Path:
    return write_population(
        tmp_path / "pop",
        GOOD_AGENTS,
        contacts_0=GOOD_CONTACTS_0,
        contacts_1=GOOD_CONTACTS_1,
    )


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth() -> Population:
    return pop.synthetic(20_000, seed=7)


def test_synthetic_is_deterministic_given_n_and_seed() -> None:
    a, b = pop.synthetic(3000, seed=3), pop.synthetic(3000, seed=3)
    assert torch.equal(a.age_group, b.age_group)
    assert [lay.name for lay in a.layers] == [lay.name for lay in b.layers]
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.src, lb.src)
        assert torch.equal(la.dst, lb.dst)
        assert torch.equal(la.weight, lb.weight)
    c = pop.synthetic(3000, seed=4)
    assert not torch.equal(a.age_group, c.age_group)
    assert not torch.equal(a.layer("community").src, c.layer("community").src)


def test_synthetic_layers_are_symmetric_sorted_and_weighted(synth: Population) -> None:
    n = synth.n_agents
    assert [lay.name for lay in synth.layers] == ["household", "school", "work", "community"]
    for layer in synth.layers:
        assert layer.n_edges > 0
        assert_symmetric_sorted(layer, n)
        assert bool((layer.weight == SYNTHETIC_LAYER_WEIGHTS[layer.name]).all())


def test_synthetic_ages_and_layer_membership(synth: Population) -> None:
    age = synth.age_group
    assert age.dtype == torch.int64
    assert int(age.min()) >= 0 and int(age.max()) < len(AGE_GROUPS)
    shares = torch.bincount(age, minlength=len(AGE_GROUPS)).double() / synth.n_agents
    expected = torch.tensor(pop.DEFAULT_AGE_DISTRIBUTION, dtype=torch.float64)
    assert torch.allclose(shares, expected / expected.sum(), atol=0.015)
    school = synth.layer("school")
    assert bool((age[school.src] == 0).all()) and bool((age[school.dst] == 0).all())
    work = synth.layer("work")
    for end in (work.src, work.dst):
        assert bool(((age[end] >= 1) & (age[end] <= 4)).all())
    # about 85 % of the working-age agents have at least one colleague
    working_age = int(((age >= 1) & (age <= 4)).sum())
    employed = int(torch.unique(work.dst).numel())
    assert 0.80 < employed / working_age < 0.86


def test_synthetic_households_are_cliques_of_consecutive_ids(synth: Population) -> None:
    n = synth.n_agents
    hh = synth.layer("household")
    deg = torch.bincount(hh.dst, minlength=n)
    assert int(deg.max()) <= 5  # sizes 1..6
    assert bool((deg[hh.src] == deg[hh.dst]).all())
    ids = torch.arange(n)
    lo = ids.clone().scatter_reduce(0, hh.dst, hh.src, reduce="amin")
    hi = ids.clone().scatter_reduce(0, hh.dst, hh.src, reduce="amax")
    # an agent and its (distinct, symmetric) neighbours fill a block of deg + 1 consecutive ids
    assert torch.equal(hi - lo, deg)
    household_count = float((1.0 / (deg + 1).double()).sum())
    assert n / household_count == pytest.approx(2.6, abs=0.08)
    assert bool((deg == 0).any()) and bool((deg == 5).any())


def test_synthetic_degrees(synth: Population) -> None:
    n = synth.n_agents
    assert 11.5 < synth.n_edges / n < 14.0
    assert synth.layer("community").n_edges / n == pytest.approx(6.0, rel=0.03)
    pupils = int((synth.age_group == 0).sum())
    assert 6.0 < synth.layer("school").n_edges / pupils < 8.0


def test_synthetic_household_mean_is_a_knob() -> None:
    small = pop.synthetic(10_000, seed=1, household_size_mean=1.5)
    deg = torch.bincount(small.layer("household").dst, minlength=10_000)
    assert 10_000 / float((1.0 / (deg + 1).double()).sum()) == pytest.approx(1.5, abs=0.06)


@pytest.mark.parametrize("n", [1, 2, 5])
def test_synthetic_tiny_populations(n: int) -> None:
    p = pop.synthetic(n, seed=0)
    assert p.n_agents == n
    for layer in p.layers:
        assert_symmetric_sorted(layer, n)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 0}, "n must be >= 1, got 0"),
        ({"n": 2.5}, "n must be an integer, got 2.5"),
        ({"n": 10, "seed": -1}, "seed must be >= 0, got -1"),
        ({"n": 10, "household_size_mean": 7.0}, "household_size_mean must be in [1, 5.5]"),
        ({"n": 10, "age_distribution": (1.0, 2.0)}, "age_distribution must be 6 finite"),
        ({"n": 10, "age_distribution": (0,) * 6}, "age_distribution must not be all zero"),
        ({"n": 10, "employment_rate": 1.5}, "employment_rate must be in [0, 1], got 1.5"),
        ({"n": 10, "community_contacts": float("nan")}, "community_contacts must be finite"),
        ({"n": 10, "class_size": (1, 3)}, "class_size must be (lo, hi) with 2 <= lo <= hi"),
    ],
)
def test_synthetic_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PopulationError) as info:
        pop.synthetic(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------
# random_contacts
# --------------------------------------------------------------------------------------------


def test_random_contacts_exact_in_degree_no_self_loops_sorted() -> None:
    n, k = 5000, 7
    p = pop.random_contacts(n, k, seed=11, weight=0.25)
    (layer,) = p.layers
    assert layer.name == "random"
    assert layer.n_edges == n * k
    assert torch.equal(torch.bincount(layer.dst, minlength=n), torch.full((n,), k))
    assert not bool((layer.src == layer.dst).any())
    assert int(layer.src.min()) >= 0 and int(layer.src.max()) < n
    assert np.all(np.diff(edge_keys(layer, n)) >= 0)  # sorted by (dst, src)
    assert bool((layer.weight == 0.25).all()) and layer.weight.dtype == torch.float32
    assert layer.src.dtype == layer.dst.dtype == torch.int64
    # sources are spread over everyone: every agent sends at least once with n*k ≫ n
    assert int(torch.unique(layer.src).numel()) > 0.99 * n
    again = pop.random_contacts(n, k, seed=11, weight=0.25).layers[0]
    assert torch.equal(again.src, layer.src)
    other = pop.random_contacts(n, k, seed=12, weight=0.25).layers[0]
    assert not torch.equal(other.src, layer.src)


def test_random_contacts_edge_cases() -> None:
    assert pop.random_contacts(10, 0).n_edges == 0
    two = pop.random_contacts(2, 3).layers[0]
    assert two.src.tolist() == [1, 1, 1, 0, 0, 0] and two.dst.tolist() == [0, 0, 0, 1, 1, 1]
    with pytest.raises(PopulationError, match="one agent cannot have contacts"):
        pop.random_contacts(1, 1)
    with pytest.raises(PopulationError, match="degree must be >= 0, got -1"):
        pop.random_contacts(10, -1)
    with pytest.raises(PopulationError, match=r"weight must be finite and >= 0, got -1\.0"):
        pop.random_contacts(10, 2, weight=-1.0)


# --------------------------------------------------------------------------------------------
# from_csv: real data
# --------------------------------------------------------------------------------------------


def test_from_csv_astoria(astoria_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sim.populations"):
        p = pop.from_csv(astoria_dir)
    n = 37_518
    assert p.n_agents == n
    assert p.name == "astoria"
    assert p.initially_infected is not None and p.initially_infected.dtype == torch.bool
    assert int(p.initially_infected.sum()) == 45

    with (astoria_dir / "agents.csv").open(newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda r: int(r["agent_id"]))
    expected_age = [AGE_GROUPS.index(r["age_group"]) for r in rows]
    assert p.age_group.tolist() == expected_age
    assert sorted(p.attributes) == ["ethnicity", "gender", "soc_code"]
    for name, values in p.attributes.items():
        assert values == [r[name] for r in rows]
    assert torch.equal(
        p.initially_infected, torch.tensor([r["initially_infected"] == "1" for r in rows])
    )

    assert [lay.name for lay in p.layers] == ["contacts_0", "contacts_1"]
    for layer in p.layers:
        raw = np.loadtxt(astoria_dir / f"{layer.name}.csv", delimiter=",", skiprows=1, dtype=int)
        raw = raw[raw[:, 0] != raw[:, 1]]
        pairs = np.unique(np.sort(raw, axis=1), axis=0)
        assert layer.n_edges == 2 * len(pairs)
        both = np.concatenate((pairs, pairs[:, ::-1]))
        expected = np.sort(both[:, 1] * n + both[:, 0])
        np.testing.assert_array_equal(edge_keys(layer, n), expected)
        assert_symmetric_sorted(layer, n)
        assert bool((layer.weight == 1.0).all())
    log = caplog.text
    assert "contacts_0.csv: 136378 rows, 6 self-loops dropped" in log
    assert "contacts_1.csv: 272654 rows, 14 self-loops dropped" in log


# --------------------------------------------------------------------------------------------
# from_csv: small well-formed files
# --------------------------------------------------------------------------------------------


def test_from_csv_small_sorts_agents_merges_and_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sim.populations"):
        p = pop.from_csv(good_dir(tmp_path))
    assert p.n_agents == 4
    assert p.age_group.tolist() == [0, 2, 5, 1]
    assert p.initially_infected is not None
    assert p.initially_infected.tolist() == [False, False, True, False]
    assert p.attributes == {"gender": ["male", "female", "female", "male"]}
    c0, c1 = p.layers
    assert (c0.src.tolist(), c0.dst.tolist()) == ([1, 0, 3, 1], [0, 1, 1, 3])
    assert c0.weight.tolist() == [1.0] * 4
    assert (c1.src.tolist(), c1.dst.tolist()) == ([2, 3, 0, 0], [0, 0, 2, 3])
    assert c1.weight.tolist() == [2.0, 1.25, 2.0, 1.25]
    assert "contacts_0.csv: 4 rows, 1 self-loops dropped, 1 repeated contacts merged" in caplog.text
    assert "contacts_1.csv: 3 rows, 0 self-loops dropped, 1 repeated contacts merged" in caplog.text


def test_from_csv_weight_multipliers(tmp_path: Path) -> None:
    p = pop.from_csv(good_dir(tmp_path), weights={"contacts_1": 2.0})
    assert p.layers[0].weight.tolist() == [1.0] * 4
    assert p.layers[1].weight.tolist() == [4.0, 2.5, 4.0, 2.5]
    with pytest.raises(PopulationError, match=r"unknown layers \['home'\]"):
        pop.from_csv(good_dir(tmp_path), weights={"home": 1.0})
    with pytest.raises(PopulationError, match=r"weights\['contacts_0'\] must be finite and >= 0"):
        pop.from_csv(good_dir(tmp_path), weights={"contacts_0": -1.0})


def test_from_csv_quoted_crlf_and_spaced_files_parse_the_same(tmp_path: Path) -> None:
    plain = pop.from_csv(good_dir(tmp_path))
    quoted_agents = (
        '"agent_id","age_group","gender","initially_infected"\r\n'
        '"2","65A","female","1"\r\n"0","U19","male","0"\r\n'
        '"1","30t39","female","0"\r\n"3","20t29","male","0"\r\n\r\n'
    )
    spaced = "src, dst\n0, 1\n1 ,0\n2,2\n 3,1\n"
    d = write_population(
        tmp_path / "quoted", quoted_agents, contacts_0=spaced, contacts_1=GOOD_CONTACTS_1
    )
    other = pop.from_csv(d)
    assert torch.equal(other.age_group, plain.age_group)
    assert other.attributes == plain.attributes
    for a, b in zip(other.layers, plain.layers, strict=True):
        assert torch.equal(a.src, b.src) and torch.equal(a.dst, b.dst)
        assert torch.equal(a.weight, b.weight)


def test_from_csv_orders_layers_numerically(tmp_path: Path) -> None:
    d = write_population(
        tmp_path / "p", GOOD_AGENTS, contacts_10="src,dst\n0,1\n", contacts_2="src,dst\n2,3\n"
    )
    assert [lay.name for lay in pop.from_csv(d).layers] == ["contacts_2", "contacts_10"]


def test_from_csv_without_initially_infected(tmp_path: Path) -> None:
    d = write_population(
        tmp_path / "p", "agent_id,age_group\n1,U19\n0,65A\n", contacts_0="src,dst\n0,1\n"
    )
    p = pop.from_csv(d)
    assert p.initially_infected is None
    assert p.age_group.tolist() == [5, 0]
    assert p.attributes == {}


# --------------------------------------------------------------------------------------------
# from_csv: bad files name the file, the line and the field
# --------------------------------------------------------------------------------------------

A2 = "agent_id,age_group\n0,U19\n1,65A\n"  # two valid agents
C2 = "src,dst\n0,1\n"

BAD_CASES: list[tuple[str, str, str, str, int, str, str]] = [
    # (case id, agents.csv, contacts_0.csv, file named, line, field, message fragment)
    ("missing-age-column", "agent_id,gender\n0,m\n", C2, "agents.csv", 1, "age_group",
     "missing column 'age_group'"),
    ("unknown-age-group", "agent_id,age_group\n0,U19\n1,U20\n", C2, "agents.csv", 3,
     "age_group", "unknown age group 'U20'"),
    ("empty-age-group", "agent_id,age_group\n0,\n1,U19\n", C2, "agents.csv", 2, "age_group",
     "empty value"),
    ("agent-id-out-of-range", "agent_id,age_group\n0,U19\n5,U19\n", C2, "agents.csv", 3,
     "agent_id", "agent id '5' out of range 0..1"),
    ("negative-agent-id", "agent_id,age_group\n-1,U19\n0,U19\n", C2, "agents.csv", 2,
     "agent_id", "agent id '-1' out of range 0..1"),
    ("duplicate-agent-id", "agent_id,age_group\n0,U19\n1,U19\n1,U19\n", C2, "agents.csv", 4,
     "agent_id", "duplicate agent id 1 (first on line 3)"),
    ("non-integer-agent-id", "agent_id,age_group\n0,U19\nx1,U19\n", C2, "agents.csv", 3,
     "agent_id", "not an integer: 'x1'"),
    ("nan-agent-id", "agent_id,age_group\n0,U19\nNaN,U19\n", C2, "agents.csv", 3, "agent_id",
     "value is NaN, expected an integer"),
    ("empty-agent-id", "agent_id,age_group\n0,U19\n,U19\n", C2, "agents.csv", 3, "agent_id",
     "empty value"),
    ("infected-not-binary", "agent_id,age_group,initially_infected\n0,U19,0\n1,U19,2\n", C2,
     "agents.csv", 3, "initially_infected", "must be 0 or 1, got '2'"),
    ("empty-agents-file", "", C2, "agents.csv", 1, "agent_id", "file is empty: no header"),
    ("agents-header-only", "agent_id,age_group\n", C2, "agents.csv", 2, "agent_id",
     "no data rows after the header"),
    ("agents-too-few-fields", "agent_id,age_group,gender\n0,U19,m\n1,U19\n", C2, "agents.csv",
     3, "gender", "2 fields, expected 3: value missing"),
    ("agents-extra-field", "agent_id,age_group\n0,U19\n1,U19,x\n", C2, "agents.csv", 3,
     "age_group", "3 fields, expected 2: extra value"),
    ("repeated-column", "agent_id,age_group,age_group\n0,U19,U19\n", C2, "agents.csv", 1,
     "age_group", "empty or repeated column name"),
    ("missing-dst-column", A2, "src,weight\n0,1\n", "contacts_0.csv", 1, "dst",
     "missing column 'dst'"),
    ("dst-out-of-range", A2, "src,dst\n0,1\n1,2\n", "contacts_0.csv", 3, "dst",
     "agent id '2' out of range 0..1"),
    ("negative-src", A2, "src,dst\n0,1\n-3,1\n", "contacts_0.csv", 3, "src",
     "agent id '-3' out of range 0..1"),
    ("non-integer-src", A2, "src,dst\n0,1\n1.5,0\n", "contacts_0.csv", 3, "src",
     "not an integer: '1.5'"),
    ("nan-dst", A2, "src,dst\n0,nan\n", "contacts_0.csv", 2, "dst",
     "value is NaN, expected an integer"),
    ("empty-dst", A2, "src,dst\n0,1\n1,\n", "contacts_0.csv", 3, "dst", "empty value"),
    ("negative-weight", A2, "src,dst,weight\n0,1,1\n1,0,-0.5\n", "contacts_0.csv", 3,
     "weight", "negative weight '-0.5'"),
    ("nan-weight", A2, "src,dst,weight\n0,1,nan\n", "contacts_0.csv", 2, "weight",
     "weight is NaN"),
    ("inf-weight", A2, "src,dst,weight\n0,1,1\n0,1,inf\n", "contacts_0.csv", 3, "weight",
     "weight 'inf' is not finite"),
    ("text-weight", A2, "src,dst,weight\n0,1,heavy\n", "contacts_0.csv", 2, "weight",
     "not a number: 'heavy'"),
    ("empty-contacts-file", A2, "", "contacts_0.csv", 1, "src", "file is empty: no header"),
    ("contacts-header-only", A2, "src,dst\n\n", "contacts_0.csv", 2, "src",
     "no data rows after the header"),
    ("blank-line-inside", A2, "src,dst\n0,1\n\n1,0\n", "contacts_0.csv", 3, "src",
     "empty line (expected 2 fields)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("agents", "contacts", "file", "line", "field_name", "fragment"),
    [case[1:] for case in BAD_CASES],
    ids=[case[0] for case in BAD_CASES],
)
def test_from_csv_bad_files(
    tmp_path: Path,
    agents: str,
    contacts: str,
    file: str,
    line: int,
    field_name: str,
    fragment: str,
) -> None:
    d = write_population(tmp_path / "bad", agents, contacts_0=contacts)
    with pytest.raises(PopulationFileError) as info:
        pop.from_csv(d)
    err = info.value
    assert (err.path.name, err.line, err.field) == (file, line, field_name)
    assert f"{file}, line {line}, field {field_name!r}: " in str(err)
    assert fragment in str(err)


def test_from_csv_locates_a_bad_value_deep_in_a_large_file(tmp_path: Path) -> None:
    n = 3000
    agents = "agent_id,age_group\n" + "".join(f"{i},40t49\n" for i in range(n))
    rows = [f"{i % n},{(i * 7 + 1) % n}\n" for i in range(5000)]
    rows[4321] = "12x,5\n"  # data row 4321 is on line 4323 (header is line 1)
    d = write_population(tmp_path / "big", agents, contacts_0="src,dst\n" + "".join(rows))
    with pytest.raises(PopulationFileError) as info:
        pop.from_csv(d)
    assert (info.value.line, info.value.field) == (4323, "src")
    assert "contacts_0.csv, line 4323, field 'src': not an integer: '12x'" in str(info.value)
    # and once fixed, the same file loads through the fast path
    rows[4321] = "12,5\n"
    (d / "contacts_0.csv").write_text("src,dst\n" + "".join(rows))
    pairs = {frozenset(map(int, r.split(","))) for r in rows}
    assert pop.from_csv(d).layers[0].n_edges == 2 * len({p for p in pairs if len(p) == 2})


def test_from_csv_missing_files(tmp_path: Path) -> None:
    d = write_population(tmp_path / "no-layers", A2)
    with pytest.raises(PopulationFileError, match=r"no-layers: no contacts_\*\.csv layer files"):
        pop.from_csv(d)
    d = write_population(tmp_path / "no-agents", None, contacts_0=C2)
    with pytest.raises(PopulationFileError, match=r"agents\.csv: file not found"):
        pop.from_csv(d)
    with pytest.raises(PopulationFileError, match="not a directory"):
        pop.from_csv(tmp_path / "absent")


def test_population_file_error_is_a_value_error() -> None:
    assert issubclass(PopulationFileError, ValueError)
    assert issubclass(PopulationSpecError, ValueError)


# --------------------------------------------------------------------------------------------
# from_spec, Population helpers
# --------------------------------------------------------------------------------------------


def test_from_spec_forms(tmp_path: Path) -> None:
    a = pop.from_spec("synthetic:500", seed=3)
    assert torch.equal(a.layer("community").src, pop.synthetic(500, 3).layer("community").src)
    assert pop.from_spec("synthetic:1e3").n_agents == 1000
    assert pop.from_spec("synthetic:1_200").n_agents == 1200
    r = pop.from_spec("random:100:5", seed=2)
    assert r.n_edges == 500
    assert torch.equal(r.layers[0].src, pop.random_contacts(100, 5, 2).layers[0].src)
    assert pop.from_spec(str(good_dir(tmp_path))).n_agents == 4


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("synthetic:", "N must be an integer >= 1, got ''"),
        ("synthetic:abc", "N must be an integer >= 1, got 'abc'"),
        ("synthetic:0", "N must be an integer >= 1, got '0'"),
        ("synthetic:2.5e0", "N must be an integer >= 1, got '2.5e0'"),
        ("random:10", "expected random:N:K"),
        ("random:10:x", "K must be an integer >= 0, got 'x'"),
        ("random:1:1", "one agent cannot have contacts"),
        ("people:10", "unknown kind 'people'"),
        ("/no/such/population/dir", "no such directory"),
    ],
)
def test_from_spec_rejects_bad_specs(spec: str, fragment: str) -> None:
    with pytest.raises(PopulationSpecError) as info:
        pop.from_spec(spec)
    assert f"population spec {spec!r}" in str(info.value)
    assert fragment in str(info.value)


def test_from_spec_rejects_a_file(tmp_path: Path) -> None:
    f = tmp_path / "agents.csv"
    f.write_text(A2)
    with pytest.raises(PopulationSpecError, match="is a file, not a directory"):
        pop.from_spec(str(f))


def test_population_to_and_summary(tmp_path: Path) -> None:
    p = pop.from_csv(good_dir(tmp_path))
    q = p.to("cpu")
    assert q is not p and q.n_agents == 4
    assert torch.equal(q.age_group, p.age_group)
    assert q.attributes == p.attributes and q.attributes is not p.attributes
    assert p.summary() == {
        "name": "pop",
        "agents": 4,
        "edges": 8,
        "layers": {"contacts_0": 4, "contacts_1": 4},
        "mean_degree": 2.0,
        "age_groups": {"U19": 1, "20t29": 1, "30t39": 1, "40t49": 0, "50t64": 0, "65A": 1},
        "initially_infected": 1,
    }
    with pytest.raises(KeyError, match="no layer 'home'"):
        p.layer("home")


def test_contact_layer_rejects_mismatched_shapes() -> None:
    with pytest.raises(PopulationError, match="src, dst and weight must be 1-D of one length"):
        ContactLayer("x", torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                     torch.zeros(3))  # fmt: skip


def test_from_csv_rejects_non_utf8_with_its_line(tmp_path: Path) -> None:
    d = tmp_path / "latin1"
    d.mkdir()
    (d / "agents.csv").write_bytes(b"agent_id,age_group,gender\n0,U19,m\n1,U19,\xe9\n")
    (d / "contacts_0.csv").write_text(C2)
    with pytest.raises(PopulationFileError, match=r"agents\.csv, line 3: not UTF-8"):
        pop.from_csv(d)
