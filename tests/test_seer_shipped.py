"""The shipped SeerAttention gates on the real SmolLM2-135M-Instruct: found by what the model is, not
by its path (transformers' own from_pretrained of the GGUF, a bf16 or fp16 copy), and their
calibration refuses densities below its range at apply()."""
import copy

import pytest
import torch
from tiny_models import smollm2_gguf

import attn_patch
from attn_patch.errors import ConfigError
from attn_patch.seer import gates_of
from attn_patch.seer import weights as W

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    """The embedded GGUF loaded by transformers alone: its _name_or_path is the package folder."""
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_shipped_gates_find_smollm2_however_it_was_loaded(smollm2):
    shipped = str(W.SHIPPED["smollm2-135m-instruct"])
    for model in (smollm2, copy.deepcopy(smollm2).to(torch.bfloat16), copy.deepcopy(smollm2).to(torch.float16)):
        with attn_patch.patched(model, "seer", density=0.1):
            assert all(gate.source == shipped for gate in gates_of(model))
            assert attn_patch.stats(model)["config"]["allocation"] == "calibrated"
        del model


def test_a_density_below_the_shipped_calibration_is_refused_at_apply(smollm2):
    for density in (0.01, 0.02):
        with pytest.raises(ConfigError, match=f"density {density} is below the lowest.*allocation='uniform'"):
            attn_patch.apply(smollm2, "seer", density=density)
        assert attn_patch.patch_state(smollm2) is None
        with attn_patch.patched(smollm2, "seer", density=density, allocation="uniform"):
            assert attn_patch.stats(smollm2)["config"]["allocation"] == "uniform"
