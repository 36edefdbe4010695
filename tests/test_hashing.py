"""Addresses must never change by accident (joblib's `test_hashes_stay_the_same`)."""

import math
from pathlib import Path

import pytest

from saectl.hashing import canonical_json, digest, file_sha256


def test_digests_stay_the_same():
    assert digest("harvest", {"a": 1, "b": [1, 2], "c": "x"}, {"in": "shuffle/ab"}) == (
        "cc529a7f6b901fc268a5efb241dca5ae80a8387df8e50de10f5b03efc801b0c3")
    assert digest("train", {}) == (
        "753447c47132b794a5910635964042fbe5a4ba6c041abeb093bf4a6e8d8fafcf")


def test_canonical_json_is_order_free_and_plain():
    assert canonical_json({"b": 1, "a": (1, 2)}) == canonical_json({"a": [1, 2], "b": 1})
    assert canonical_json({"p": Path("/x")}) == '{"p":"/x"}'
    assert digest("s", {"x": 1}) != digest("s", {"x": 1.5})
    assert digest("s", {"x": 1}) != digest("t", {"x": 1})
    assert digest("s", {"x": 1}, {"i": "a/1"}) != digest("s", {"x": 1}, {"i": "a/2"})


@pytest.mark.parametrize("bad", [math.nan, math.inf, object(), {1: "x"}])
def test_unhashable_values_are_refused(bad):
    with pytest.raises((TypeError, ValueError)):
        digest("s", {"x": bad})


def test_file_sha256(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    assert file_sha256(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
