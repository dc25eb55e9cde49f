import pytest

from romscale.errors import RomscaleError
from romscale.meki.config import MekiConfig


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"d_mem": 0}, "d_mem"),
        ({"memory": "both"}, "memory"),
        ({"position": "before_attn"}, "position"),
        ({"fusion": "concat"}, "fusion"),
        ({"dynamic_proj": "mlp"}, "dynamic_proj"),
    ],
)
def test_bad_values_name_the_field(kwargs, word):
    with pytest.raises(RomscaleError, match=word):
        MekiConfig(**kwargs)


def test_round_trip_and_unknown_keys():
    cfg = MekiConfig(d_mem=8, memory="static", position="after_ffn", fusion="mul_silu", layers=(1, 0))
    assert MekiConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(RomscaleError, match="unknown MeKi config keys"):
        MekiConfig.from_dict({**cfg.to_dict(), "colour": "red"})


def test_layer_indices_checked():
    assert MekiConfig(layers=(1,)).layer_indices(2) == [1]
    with pytest.raises(RomscaleError, match="outside"):
        MekiConfig(layers=(5,)).layer_indices(2)
