import pytest

from ifcvf.devargs import Devargs, DevargsError, parse


@pytest.mark.parametrize("text, expected", [
    ("vdpa=1", Devargs(vdpa=True)),
    ("vdpa=0x1,sw-live-migration=1", Devargs(vdpa=True, sw_live_migration=True)),
    ("vdpa=010", Devargs(vdpa=True)),          # octal, like strtoul base 0
    ("vdpa=0", Devargs()),
    ("", Devargs()),
    (None, Devargs()),
    (" vdpa = 1 ", Devargs(vdpa=True)),
    ("vdpa=1,generic-virtio-net=1", Devargs(vdpa=True, generic_virtio_net=True)),
])
def test_parse(text, expected):
    assert parse(text) == expected


@pytest.mark.parametrize("text, message", [
    ("vdpa=1,bogus=1", "unknown key 'bogus'"),
    ("vdpa=yes", "vdpa='yes' is not a number"),
    ("vdpa=08", "is not a number"),            # 08 is not octal
    ("vdpa=65536", "outside 0..65535"),
    ("vdpa=-1", "outside 0..65535"),
    ("vdpa", "needs a value"),
    ("vdpa=1,vdpa=1", "given twice"),
])
def test_rejects_with_the_key_named(text, message):
    with pytest.raises(DevargsError, match=message):
        parse(text)


def test_str_round_trips():
    args = Devargs(vdpa=True, sw_live_migration=True)
    assert parse(str(args)) == args
