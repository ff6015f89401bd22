import os

import pytest

from pole_hf.naming import confined_path, output_stems, safe_stem


@pytest.mark.parametrize("name, stem", [
    ("2007_000032", "2007_000032"), (123, "123"), ("img-7.v2", "img-7.v2"),
    ("../../../victim/important", "victim__important"), ("/etc/passwd", "etc__passwd"),
    ("a\\..\\b", "a__b"), ("..", "_"), (".hidden", "hidden"), ("x y:z", "x_y_z"),
])
def test_safe_stem(name, stem):
    assert safe_stem(name) == stem


def test_output_stems_are_distinct_and_stable():
    names = ["a/x", "b/x", "x", "x", "X", "a__x"]
    stems = output_stems(names)
    assert stems == ["a__x", "b__x", "x", "x-2", "X-3", "a__x-2"]
    assert output_stems(names) == stems


def test_confined_path_refuses_escapes(tmp_path):
    assert confined_path(tmp_path, "a.npy") == os.path.realpath(tmp_path / "a.npy")
    for bad in ("../a.npy", "/tmp/a.npy", "sub/a.npy"):
        with pytest.raises(ValueError, match="outside"):
            confined_path(tmp_path, bad)
