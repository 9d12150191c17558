"""Property-based fuzzing of the text and pickle parsers a user's files reach first: the LFW
pairs.txt parser, the TOML recipe loader and stage configs, and the `.bin` pack reader.
(The RecordIO framing parser is fuzzed in test_data_pairs.py.)

Property everywhere: any input gives a clean result or BadInputError, never another exception,
never a hang on a hostile header, and never executed code."""

from __future__ import annotations

import os
import pickle
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from shrinkcli.config import STAGE_CONFIGS, load_recipe, stage_config_from_recipe
from shrinkcli.data.binpack import read_bin, write_bin
from shrinkcli.data.splits import parse_pairs_file
from shrinkcli.errors import BadInputError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

names = st.text(alphabet=st.characters(whitelist_categories=("Lu", "Ll", "Nd"), whitelist_characters="_-."),
                min_size=1, max_size=12)
numbers = st.integers(1, 9999)


# ------------------------------------------------------------------------------------ pairs.txt

@st.composite
def pairs_files(draw):
    """A well-formed pairs.txt with either header, plus the pairs it must parse to."""
    per_fold = draw(st.integers(1, 4))
    folds = draw(st.integers(1, 3))
    official = draw(st.booleans())
    expected = []
    if official:
        lines = [f"{folds} {per_fold}"]
        for fold in range(folds):
            for same in (True, False):
                for _ in range(per_fold):
                    expected.append((draw(names), draw(numbers), draw(names), draw(numbers), same, fold))
    else:
        count = folds * per_fold
        lines = [str(count)]
        fold_size = count // 10 if count % 10 == 0 else count
        for same in (True, False):
            for i in range(count):
                expected.append((draw(names), draw(numbers), draw(names), draw(numbers), same, i // fold_size))
    for name1, i, name2, j, same, _ in expected:
        lines.append(f"{name1}\t{i}\t{j}" if same else f"{name1}\t{i}\t{name2}\t{j}")
    return "\n".join(lines) + "\n", expected


@FUZZ
@given(case=pairs_files())
def test_well_formed_pairs_files_round_trip(tmp_path, case):
    text, expected = case
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    parsed = [(p.name1, p.index1, p.name2, p.index2, p.same, p.fold) for p in parse_pairs_file(path)]
    assert parsed == [(a, i, a if same else b, j, same, fold) for a, i, b, j, same, fold in expected]


token = st.one_of(names, st.integers(-5, 10**12).map(str), st.sampled_from(["", "\t", " ", "#", "3000", "10 300"]))
line = st.lists(token, max_size=5).map(" ".join)


@FUZZ
@given(lines=st.lists(line, max_size=12), mutate=st.one_of(st.none(), pairs_files()))
def test_arbitrary_pairs_text_is_parsed_or_refused(tmp_path, lines, mutate):
    text = "\n".join(lines)
    if mutate is not None:                       # splice noise into a valid file to reach deeper checks
        valid = mutate[0].splitlines()
        text = "\n".join(valid[: len(valid) // 2] + lines + valid[len(valid) // 2:])
    path = tmp_path / "pairs.txt"
    path.write_text(text)
    try:
        pairs = parse_pairs_file(path)
    except BadInputError as exc:
        assert "pairs file" in str(exc) and "\n" not in str(exc)
        return
    body = [line for line in text.splitlines() if line.split()][1:]
    assert len(pairs) == len(body)
    assert all(p.name1 == p.name2 for p in pairs if p.same)


@pytest.mark.parametrize("header", ["1000000000 1000000000", "999999999999", "3 99999999999"])
def test_hostile_pairs_header_is_refused_at_once(tmp_path, header):
    path = tmp_path / "pairs.txt"
    path.write_text(f"{header}\nAlice 1 2\n")
    started = time.perf_counter()
    with pytest.raises(BadInputError, match="header promises"):
        parse_pairs_file(path)
    assert time.perf_counter() - started < 1.0


@FUZZ
@given(data=st.binary(max_size=200))
def test_binary_garbage_as_pairs_file(tmp_path, data):
    path = tmp_path / "pairs.txt"
    path.write_bytes(data)
    try:
        parse_pairs_file(path)
    except BadInputError:
        pass


# --------------------------------------------------------------------------------------- recipes

@FUZZ
@given(text=st.text(max_size=300))
def test_arbitrary_recipe_text_is_loaded_or_refused(tmp_path, text):
    path = tmp_path / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(path)
    except BadInputError as exc:
        assert "recipe" in str(exc)
        return
    for stage in STAGE_CONFIGS:
        try:
            stage_config_from_recipe(recipe, stage, str(path))
        except BadInputError:
            pass


scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                   st.text(max_size=12), st.sampled_from(["r18", "arcface", "cosface", "angular", "onnx", "1,1,1,1"]))
value = st.one_of(scalar, st.lists(scalar, max_size=5), st.dictionaries(st.text(max_size=5), scalar, max_size=3))
ALL_KEYS = sorted({f for cls in STAGE_CONFIGS.values() for f in cls.__dataclass_fields__} | {"epoch", "lr_", ""})


@FUZZ
@given(stage=st.sampled_from(sorted(STAGE_CONFIGS)),
       table=st.dictionaries(st.sampled_from(ALL_KEYS), value, max_size=6),
       common=st.dictionaries(st.sampled_from(ALL_KEYS), value, max_size=4))
def test_recipe_tables_with_any_keys_and_types_validate_or_refuse(stage, table, common):
    recipe = {stage: table, "common": common}
    try:
        config = stage_config_from_recipe(recipe, stage, "fuzz.toml")
    except BadInputError as exc:
        assert "\n" not in str(exc)
        return
    cls = STAGE_CONFIGS[stage]
    # what validated round-trips: a manifest's config rebuilds the same object
    assert cls.from_dict(config.to_dict()) == config


# -------------------------------------------------------------------------------------- .bin packs

class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_FUZZ",))


@FUZZ
@given(data=st.binary(max_size=300), seed_from_valid=st.booleans(), cut=st.integers(0, 400),
       flips=st.lists(st.tuples(st.integers(0, 400), st.integers(1, 255)), max_size=4))
def test_bin_reader_survives_garbage_and_mutated_packs(tmp_path, monkeypatch, data, seed_from_valid, cut, flips):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "x.bin"
    if seed_from_valid:
        write_bin(path, [b"\xff\xd8" + data[:20], data[20:40]], [True])
        blob = bytearray(path.read_bytes()[: max(cut, 1)])
        for position, xor in flips:
            if position < len(blob):
                blob[position] ^= xor
        path.write_bytes(bytes(blob))
    else:
        path.write_bytes(data)
    try:
        images, issame = read_bin(path)
        assert len(images) == 2 * len(issame)
    except BadInputError:
        pass
    assert not (tmp_path / "PWNED_BY_FUZZ").exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_bin_reader_refuses_code_in_every_pickle_protocol(tmp_path, monkeypatch, protocol):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([_Exploit(), b"x"], [True]), protocol=protocol))
    with pytest.raises(BadInputError, match="refusing to load global"):
        read_bin(path)
    assert not (tmp_path / "PWNED_BY_FUZZ").exists()
