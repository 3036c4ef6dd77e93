import pytest

from gradstore import UnknownNameError, parse_encoding
from gradstore.encodings import all_names


@pytest.mark.parametrize("name", all_names())
def test_every_plain_name_round_trips(name):
    assert parse_encoding(name).name == name


def test_suffixes_parse_and_round_trip():
    enc = parse_encoding("absmax4-global-centered")
    assert (enc.kind, enc.bits, enc.global_scale, enc.centered) == ("absmax", 4, True, True)
    assert enc.name == "absmax4-global-centered"
    assert parse_encoding("SIGN1-centered").name == "sign1-centered"


@pytest.mark.parametrize("bad", ["absmax3", "f8", "sign2", "f16-global", "sign1-global", "absmax8-foo", ""])
def test_unknown_names_are_refused_with_the_list(bad):
    with pytest.raises(UnknownNameError, match="expected one of|takes no|no scale"):
        parse_encoding(bad)


@pytest.mark.parametrize("name,dim,expected", [("sign1", 8192, 1024), ("sign1", 65, 16),
                                               ("absmax4", 10, 8), ("absmax8", 9, 16), ("f16", 3, 8),
                                               ("f32", 8192, 32768), ("absmax2", 8192, 2048)])
def test_row_bytes_pad_to_eight(name, dim, expected):
    assert parse_encoding(name).row_bytes(dim) == expected


def test_levels():
    assert [parse_encoding(n).levels for n in ("absmax8", "absmean4", "absmax2", "sign1")] == [127, 7, 1, 1]
