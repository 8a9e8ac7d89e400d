"""fermi.rope against transformers' modeling_rope_utils: every scaling kind's
inverse frequencies and attention factor, from the same config."""

import numpy as np
import pytest
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from fermi.config import ModelConfig
from fermi.rope import frequencies, parameters

HEAD_DIM, MAX_POS = 64, 131072
KINDS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32768},
    "yarn-mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                    "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "beta_fast": 32,
                    "beta_slow": 1},
    "longrope": {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                 "short_factor": list(np.linspace(1.0, 1.2, HEAD_DIM // 2)),
                 "long_factor": list(np.linspace(1.0, 40.0, HEAD_DIM // 2))},
}


def hf_config(params):
    return LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, head_dim=HEAD_DIM, max_position_embeddings=MAX_POS,
                       rope_parameters=dict(params))


@pytest.mark.parametrize("name", KINDS)
def test_frequencies_equal_transformers(name):
    params = KINDS[name]
    hf = hf_config(params)
    kind = params["rope_type"]
    ours = frequencies(params, HEAD_DIM, MAX_POS)
    compute = ROPE_INIT_FUNCTIONS.get(kind, LlamaRotaryEmbedding.compute_default_rope_parameters)
    inv, attention = compute(hf, device="cpu")
    np.testing.assert_allclose(ours.inv_freq, inv.numpy(), rtol=3e-7)
    assert ours.attention_factor == pytest.approx(attention, rel=1e-7)
    if kind == "longrope":  # past the original context: the long factors
        long, _ = ROPE_INIT_FUNCTIONS[kind](hf, device="cpu", seq_len=MAX_POS)
        np.testing.assert_allclose(ours.long_inv_freq, long.numpy(), rtol=3e-7)
        assert ours.long_from == params["original_max_position_embeddings"]
        assert not np.allclose(ours.long_inv_freq, ours.inv_freq)


def test_which_spelling_wins():
    old = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 5e5,
                                 "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert parameters(old) == {"type": "linear", "factor": 2.0, "rope_theta": 5e5, "rope_type": "linear"}
    new = ModelConfig.from_dict({**{k: v for k, v in vars(old).items() if k != "extra"}, "rope_theta": 1.0,
                                 "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert parameters(new) == {"rope_type": "default", "rope_theta": 1e6}  # transformers 5's dict wins
    per_layer = ModelConfig.from_dict({**{k: v for k, v in vars(old).items() if k != "extra"}, "rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}})
    assert parameters(per_layer, "sliding_attention")["rope_theta"] == 1e4
    assert parameters(per_layer, "full_attention")["factor"] == 8.0


def test_an_unknown_kind_is_one_clear_error():
    from fermi.errors import FermiError

    with pytest.raises(FermiError, match="RoPE scaling 'dynamic2' is not supported"):
        frequencies({"rope_type": "dynamic2", "rope_theta": 1e4}, HEAD_DIM, MAX_POS)
