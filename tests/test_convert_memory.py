"""Conversion memory is bounded by the largest tensor, not the model (issue 6, item 3), measured from outside.

A synthetic Llama in 3 safetensors shards (numpy + safetensors, no transformers), over four times the limit; each
conversion runs in a fresh child whose peak resident set the kernel reports to its parent (benchmarks/
convert_memory.py `peak_rss`: a small launcher forks it, so the test process's own size does not leak into the
figure). The limit is K x the largest tensor's float32 size above a child that only imports the converter.
About 10 s on a 2-core machine (writing the checkpoint, three children).
"""
from __future__ import annotations

import sys

import pytest

from benchmarks.convert_memory import K, Shape, baseline_cmd, convert_cmd, peak_rss, write_checkpoint
from occrt.format import OccFile

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in kilobytes: Linux")


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    shape = Shape(layers=6)
    root = str(tmp_path_factory.mktemp("big_llama"))
    total = write_checkpoint(root, shape, layers_per_shard=2)
    return root, shape, total


def test_the_measurement_sees_memory_held():
    """The instrument can fail the claim: a child that imports the same and holds K + 1 largest tensors is caught."""
    shape = Shape(layers=6)
    base, _, _ = peak_rss(baseline_cmd())
    n = (K + 1) * shape.largest_f32_bytes()
    cmd = baseline_cmd()
    cmd[-1] += f"; import numpy; held = numpy.full({n}, 1, numpy.uint8)"
    peak, _, _ = peak_rss(cmd)
    assert peak - base > K * shape.largest_f32_bytes()


@pytest.mark.parametrize("extra", [(), ("--bpw", "3")], ids=["raw", "bpw3"])
def test_convert_peak_memory_is_a_few_tensors(big_checkpoint, tmp_path, extra):
    src, shape, total = big_checkpoint
    limit = K * shape.largest_f32_bytes()
    assert total > 4 * limit  # the whole model could not fit under the limit
    base, _, _ = peak_rss(baseline_cmd())
    out = tmp_path / "big.occ"
    peak, seconds, _ = peak_rss(convert_cmd(src, str(out), *extra))
    growth = peak - base
    print(f"{extra or 'raw'}: model {total >> 20} MiB, baseline {base >> 20} MiB, peak {peak >> 20} MiB, growth "
          f"{growth >> 20} MiB = {growth / shape.largest_f32_bytes():.2f} x largest tensor (limit {K}), {seconds:.1f} s")
    assert growth <= limit, f"grew {growth >> 20} MiB, limit {limit >> 20} MiB"
    with OccFile.open(out) as occ:
        assert len(occ.tensors) == len(shape.tensors())
