"""Calibration: second moments and sensitivities from text, error-feedback rounding, and --calib end to end."""
from __future__ import annotations

import numpy as np
import pytest

import occrt
from occrt.converters.calibrate import calibrate, calibration_windows
from occrt.converters.convert import ConvertOptions, convert, open_source
from occrt.converters.gptq import cholesky_inverse_upper, ecsq_error_feedback, ecsq_error_feedback_reference
from tests.conftest import WORDS, hf_logits, make_llama_dir

TEXT = " ".join(WORDS * 40)
IDS = [1, 17, 5, 93, 200, 41, 7, 7, 150, 3, 64, 250, 11, 90, 120, 33]


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(TEXT)
    return str(path)


def test_the_feedback_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    rng = np.random.default_rng(1)
    n = 40
    x = rng.standard_normal((80, n)) @ np.diag(np.logspace(0, 3, n))  # condition number ~1e6
    h = x.T @ x / 80
    h[3], h[:, 3] = 0, 0  # an input that never fires gets a unit diagonal (the mean, damped)
    u = cholesky_inverse_upper(h, damp=0.1)
    damped = h.copy()
    diag = np.diag(h).copy()
    mean = diag[diag > 0].mean()
    damped[np.diag_indices(n)] = np.where(diag > 0, diag, mean) + 0.1 * mean
    assert np.array_equal(u, np.triu(u)) and (np.diag(u) > 0).all()
    np.testing.assert_allclose(u.T @ u @ damped, np.eye(n), atol=1e-9)


def test_feedback_kernel_matches_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24)) @ rng.standard_normal((24, 24))
    u = cholesky_inverse_upper(x.T @ x / 500, damp=0.01)
    w = rng.standard_normal((17, 24))
    assert np.array_equal(ecsq_error_feedback(w, u, 0.3), ecsq_error_feedback_reference(w, u, 0.3))


def test_feedback_lowers_output_error_at_the_same_step():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 32)) @ (np.eye(32) + 0.6 * rng.standard_normal((32, 32)))  # correlated inputs
    h = x.T @ x / len(x)
    w = rng.standard_normal((64, 32))
    step = 0.4
    plain = np.rint(w / step)
    fed = ecsq_error_feedback(w, cholesky_inverse_upper(h, damp=1e-4), step)
    out_err = lambda c: np.trace((c * step - w) @ h @ (c * step - w).T)  # noqa: E731
    assert out_err(fed) < 0.7 * out_err(plain)
    # a dead input (never fires) does not break the factorization
    h[:, 5] = h[5, :] = 0
    assert np.isfinite(cholesky_inverse_upper(h, damp=0.1)).all()


def test_heap_reuse_leaves_the_statistics_alone(tiny_llama_dir):
    """The command line's malloc thresholds (converters/source.py) change where buffers live, never what the
    calibration computes: the same Fisher values and second moments with the gradient pass reusing the heap."""
    import platform
    import sys

    from occrt.converters.source import MallocThresholds

    heap = MallocThresholds.install()
    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert heap is not None
    plain = calibrate(open_source(tiny_llama_dir), TEXT, n_tokens=200, ctx=64)
    reused = calibrate(open_source(tiny_llama_dir), TEXT, n_tokens=200, ctx=64, heap=heap)
    assert reused.fisher == plain.fisher
    for key in plain.hessians:
        assert np.array_equal(reused.hessians[key], plain.hessians[key])
    if heap is not None:
        assert heap._set(MallocThresholds.STREAMING)  # glibc takes the thresholds the class sets
        assert heap._set(MallocThresholds.REUSE)
        assert heap._set(MallocThresholds.STREAMING)


def test_checkpointed_layers_trim_the_reused_heap_each_layer_pass(tiny_llama_dir, monkeypatch):
    """With a heap, checkpointed layers reuse it and hand its free pages back every TRIM_EVERY layer passes, after
    each layer's forward and as its backward begins; the gradients are those without a heap, and the layers are
    restored afterwards."""
    import contextlib

    import torch

    from occrt.converters import calibrate as cal

    class CountingHeap:  # stands in for MallocThresholds: records what checkpointed_layers asks of glibc
        def __init__(self):
            self.trims, self.reusing = 0, False

        @contextlib.contextmanager
        def reuse(self):
            self.reusing = True
            try:
                yield
            finally:
                self.reusing = False

        def trim(self):
            assert self.reusing
            self.trims += 1

    model, _ = cal.calibration_model(open_source(tiny_llama_dir))
    n = model.config.num_hidden_layers
    layers = cal._decoder_layers(model, n)

    def gradients(heap):
        model.zero_grad(set_to_none=True)
        with cal.checkpointed_layers(model, n, heap):
            model(input_ids=torch.tensor([IDS]), use_cache=False).logits.square().mean().backward()
        assert all("forward" not in vars(layer) for layer in layers)
        return [p.grad.clone() for p in model.parameters()]

    plain = gradients(None)
    monkeypatch.setattr(cal, "TRIM_EVERY", 1)
    heap = CountingHeap()
    trimmed = gradients(heap)
    assert heap.trims == 2 * n and not heap.reusing
    assert all(torch.equal(a, b) for a, b in zip(plain, trimmed))
    monkeypatch.setattr(cal, "TRIM_EVERY", 2 * n)
    heap = CountingHeap()
    gradients(heap)
    assert heap.trims == 1


def test_heap_reuse_leaves_the_tuned_file_alone(tiny_llama_dir, calib_file, tmp_path):
    """The tuning's steps reuse glibc's heap when the command line installs its thresholds: the same file byte
    for byte."""
    import hashlib

    from occrt.converters.source import MallocThresholds

    heap = MallocThresholds.install()
    digests = []
    for k, h in enumerate((None, heap)):
        out = tmp_path / f"{k}.occ"
        convert(tiny_llama_dir, str(out), ConvertOptions(bpw=3.0, calib=calib_file, calib_tokens=256, tune_steps=3),
                log=lambda m: None, heap=h)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_second_moments_match_the_model(tiny_llama_dir, tiny_occ):
    source = open_source(tiny_llama_dir)
    cal = calibrate(source, TEXT, n_tokens=200, ctx=64)
    assert set(cal.fisher) == {n for n in source.tensor_names() if n.endswith("_proj.weight")}
    assert all(v > 0 for v in cal.fisher.values())
    # layer 0's attention input is rmsnorm(embedding) * gain: recompute E[x xᵀ] from the tensors themselves
    from occrt.format import OccFile

    with OccFile.open(tiny_occ) as f:
        embed = np.asarray(f.tensor("model.embed_tokens.weight"), dtype=np.float64)
        gain = np.asarray(f.tensor("model.layers.0.input_layernorm.weight"), dtype=np.float64)
        eps = f.metadata["model.config"]["rms_norm_eps"]
    ids = np.concatenate([np.asarray(w) for w in calibration_windows(source, TEXT, n_tokens=200, ctx=64)])
    e = embed[ids]
    x = e / np.sqrt((e * e).mean(axis=1, keepdims=True) + eps) * gain
    h = x.T @ x / len(x)
    assert len(x) == cal.tokens
    got = cal.hessian_for("model.layers.0.self_attn.k_proj.weight")
    assert np.allclose(got, h, rtol=1e-4, atol=1e-6 * np.abs(h).max())
    assert cal.hessian_for("model.layers.0.mlp.down_proj.weight").shape == (96, 96)


def test_calib_conversion_meets_target_and_helps(tiny_llama_dir, calib_file, tmp_path):
    ref = hf_logits(tiny_llama_dir, IDS)
    errs = {}
    # tuning off: on a model this small its multipliers cost ~0.4 bit per weight (test below)
    for label, extra in (("plain", {}), ("calib", {"calib": calib_file, "calib_tokens": 512, "tune_steps": 0})):
        out = str(tmp_path / f"{label}.occ")
        summary = convert(tiny_llama_dir, out, ConvertOptions(bpw=3.0, rotate="in", **extra), log=lambda m: None)
        assert abs(summary["linear_bpw"] / 3.0 - 1) < 0.02
        m = occrt.load(out)
        errs[label] = float(np.linalg.norm(m.forward(np.asarray(IDS), m.new_cache(16), all_logits=True) - ref))
    assert errs["calib"] < errs["plain"]


def test_calib_needs_bpw_and_a_readable_file(tiny_llama_dir, tmp_path):
    from occrt.errors import ConversionError

    with pytest.raises(ConversionError, match="needs --bpw"):
        convert(tiny_llama_dir, str(tmp_path / "x.occ"), ConvertOptions(calib="x.txt"), log=lambda m: None)
    with pytest.raises(ConversionError, match="--calib"):
        convert(tiny_llama_dir, str(tmp_path / "y.occ"), ConvertOptions(bpw=3.0, calib=str(tmp_path / "nope.txt")),
                log=lambda m: None)
    assert not (tmp_path / "x.occ").exists() and not (tmp_path / "y.occ").exists()


def test_tuning_keeps_the_rate_and_codes_and_fits_the_source(tiny_llama_dir, calib_file, tmp_path):
    """--tune-steps: same bits (the multipliers were counted from the start), the codes' ANS blocks unchanged byte for
    byte, and the coded model's logits closer to the source's on the calibration text than before tuning."""
    from occrt.codecs.ecsq import Layout
    from occrt.format import OccFile

    source = open_source(tiny_llama_dir)
    ids = calibration_windows(source, TEXT, n_tokens=64, ctx=64)[0]
    ref = hf_logits(tiny_llama_dir, ids)
    errs, files = {}, {}
    # 1 step: a and b exist (unit-initialised, their bytes counted by the rate control) but have barely moved; on
    # a model this small they cost ~0.4 bit per weight, so compare with that, not with a file without them
    for steps in (1, 24):
        out = str(tmp_path / f"t{steps}.occ")
        summary = convert(tiny_llama_dir, out, ConvertOptions(bpw=3.0, calib=calib_file, calib_tokens=512,
                                                              tune_steps=steps), log=lambda m: None)
        assert abs(summary["linear_bpw"] / 3.0 - 1) < 0.02
        m = occrt.load(out)
        errs[steps] = float(np.linalg.norm(m.forward(np.asarray(ids), m.new_cache(len(ids)), all_logits=True) - ref))
        files[steps] = out
    assert errs[24] < 0.9 * errs[1]
    with OccFile.open(files[1]) as f1, OccFile.open(files[24]) as f24:
        name = "model.layers.1.mlp.down_proj.weight"
        e1, e24 = f1.tensors[name], f24.tensors[name]
        assert e1.params == e24.params and e1.params["row_scales"] and e1.params["col_scales"]
        start = Layout.of(*e1.shape, e1.params).codes
        p1, p24 = bytes(f1.payload(e1)), bytes(f24.payload(e24))
        assert p1[start:] == p24[start:]  # codes untouched
        assert p1[:start] != p24[:start]  # multipliers tuned
        assert np.array_equal(f1.tensor("model.norm.weight"), f24.tensor("model.norm.weight"))  # gains as the source


def test_tuning_needs_calibration(tiny_llama_dir, tmp_path):
    from occrt.errors import ConversionError

    with pytest.raises(ConversionError, match="--tune-steps needs --calib"):
        convert(tiny_llama_dir, str(tmp_path / "x.occ"), ConvertOptions(bpw=3.0, tune_steps=4), log=lambda m: None)


def _plain_statistics(source, windows):
    """The statistics the straightforward way: the whole model's forward with its logits, one backward, every
    weight's .grad kept; H from hooks on the same forward (float64)."""
    import torch

    from occrt.converters.architectures import hf_mapper
    from occrt.converters.calibrate import _LINEAR, _SPACE, calibration_model

    model, rules = calibration_model(source)
    mapper = hf_mapper(source.config)
    sums, n_tokens, fisher, handles = {}, 0, {p: 0.0 for r in rules for p in r.parts}, []
    for rule in rules:
        m = _LINEAR.fullmatch(rule.parts[0])
        key = f"{m.group(1)}.{_SPACE[m.group(2)]}"
        if key in sums:
            continue  # q, k and v (gate and up) read one input: one hook per input space
        sums[key] = 0
        module = model.get_submodule(rule.source.rsplit(".", 1)[0])
        handles += [module.register_forward_hook(lambda mod, args, out, key=key: sums.__setitem__(
            key, sums.get(key, 0) + (lambda x: x.T @ x)(args[0].detach().reshape(-1, args[0].shape[-1]).double())))]
    for window in windows:
        ids = torch.tensor([window])
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(ids).logits[0, :-1].float(), ids[0, 1:], reduction="sum").backward()
        for rule in rules:
            g2 = (model.get_parameter(rule.source).grad.double() ** 2).numpy()
            for part, piece in zip(rule.parts, mapper.split(rule, g2)):
                fisher[part] += float(piece.mean()) / len(windows)
        n_tokens += len(window)
    for h in handles:
        h.remove()
    with torch.no_grad():
        hidden = [model.base_model(input_ids=torch.tensor([w])).last_hidden_state[0].numpy() for w in windows]
    return {k: (v / n_tokens).numpy() for k, v in sums.items()}, fisher, hidden


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2", "gemma2"])
def test_bounded_memory_statistics_equal_the_plain_ones(family, tmp_path):
    """calibrate() batches the second-moment pass, sums on disk, checkpoints the layers and the head, and drops each
    gradient once reduced: the figures are those of the plain computation (fused q/k/v, Conv1D, a soft-capped
    head), and the temporary directory goes with the Calibration."""
    import gc
    import os

    if family == "llama":
        src = make_llama_dir(tmp_path / family)
    elif family == "gemma2":
        from tests.test_gemma import make_gemma_dir

        src = make_gemma_dir(tmp_path / family, family)
    else:
        from tests.test_families import make_family_dir

        src = make_family_dir(tmp_path / family, family, seed=3)
    source = open_source(src)
    cal = calibrate(source, TEXT, n_tokens=300, ctx=64)  # 5 windows of 65 and a short one: two batch shapes
    windows = calibration_windows(source, TEXT, n_tokens=300, ctx=64)
    hessians, fisher, hidden = _plain_statistics(source, windows)
    assert set(cal.hessians) == set(hessians) and set(cal.fisher) == set(fisher)
    # the source model's last hidden states per window (the tuning's teacher side), from the batched forward
    assert cal.windows == cal.tuning == windows and len(cal.hidden) == len(hidden)
    for got, want in zip(cal.hidden, hidden):
        assert got.dtype == np.float32 and np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for key, h in hessians.items():
        assert np.allclose(cal.hessians[key], h, rtol=1e-4, atol=1e-5 * np.abs(h).max()), key
    for name, f in fisher.items():
        assert cal.fisher[name] == pytest.approx(f, rel=1e-3), name
    folder = cal.hessians._dir
    assert os.path.isdir(folder)
    del cal
    gc.collect()
    assert not os.path.exists(folder)


def test_the_fisher_and_the_tuning_read_spread_subsets_of_many_windows(tiny_llama_dir, monkeypatch):
    """Past FISHER_TOKENS the gradient pass reads windows spread evenly over the calibration's, first and last
    included, and its figures are those of those windows alone; the teacher's hidden states are kept for as many
    windows as the tuning will read, spread the same way; the second moments still come from every window."""
    from occrt.converters import calibrate as cal_mod
    from occrt.converters.calibrate import fisher_windows, spread

    assert spread(5, None) == spread(5, 5) == spread(5, 9) == [0, 1, 2, 3, 4]
    assert spread(5, 0) == spread(5, 1) == [0] and spread(5, 2) == [0, 4] and spread(0, 3) == []
    windows = [[i] * 10 for i in range(9)]
    assert fisher_windows(windows, 90) is windows and fisher_windows(windows, 1000) is windows
    assert fisher_windows(windows, 30) == [windows[0], windows[4], windows[8]]
    assert fisher_windows(windows, 1) == [windows[0]]
    assert [w[0] for w in fisher_windows(windows, 50)] == [0, 2, 4, 6, 8]

    source = open_source(tiny_llama_dir)
    monkeypatch.setattr(cal_mod, "FISHER_TOKENS", 3 * 65)
    # 7 windows: 6 of 65 tokens and one of 17; the tuning reads 4 (first, 2nd, 4th, last: indices 0, 2, 4, 6)
    cal = calibrate(source, TEXT, n_tokens=400, ctx=64, tuning_windows=4)
    windows = calibration_windows(source, TEXT, n_tokens=400, ctx=64)
    picked = fisher_windows(windows, 3 * 65)
    assert len(windows) == 7 and picked == [windows[0], windows[3], windows[6]]
    hessians, _, hidden = _plain_statistics(source, windows)
    _, fisher, _ = _plain_statistics(source, picked)
    assert cal.windows == windows and cal.tokens == sum(len(w) for w in windows)
    assert cal.tuning == [windows[i] for i in (0, 2, 4, 6)] and len(cal.hidden) == 4
    for got, want in zip(cal.hidden, [hidden[i] for i in (0, 2, 4, 6)]):
        assert got.shape == want.shape and np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for key, h in hessians.items():
        assert np.allclose(cal.hessians[key], h, rtol=1e-4, atol=1e-5 * np.abs(h).max()), key
    for name, f in fisher.items():
        assert cal.fisher[name] == pytest.approx(f, rel=1e-3), name


@pytest.mark.parametrize("rotate", ["in", "both"])
def test_the_tuning_student_is_the_coded_model(tiny_llama_dir, calib_file, tmp_path, rotate):
    """The student the tuning differentiates (converters/finetune.py: codes kept as integers inside the source's
    torch model, rotations applied to the activations, the decoded embedding swapped in) computes the logits occrt's
    runtime computes from the written file; switched off, it is the source model again."""
    import torch

    from occrt.converters.calibrate import calibration_model, head_logits
    from occrt.converters.finetune import Student
    from occrt.format import OccFile

    out = str(tmp_path / "coded.occ")
    convert(tiny_llama_dir, out, ConvertOptions(bpw=3.0, calib=calib_file, calib_tokens=256, tune_steps=1,
                                                rotate=rotate, ranks=(0, 4)), log=lambda m: None)
    source = open_source(tiny_llama_dir)
    teacher, _ = calibration_model(source)
    from occrt.codecs.base import Encoded
    from occrt.codecs.ecsq import Layout

    def record(f, e):  # the record as the converter handed it to the writer: side data, then the ANS block
        p, start = bytes(f.payload(e)), Layout.of(*e.shape, e.params).codes
        return Encoded(codec=e.codec, codec_version=e.codec_version, dtype=e.dtype, shape=tuple(e.shape),
                       payload=[p[:start], p[start:]], params=e.params)

    with OccFile.open(out) as f:
        records = {n: record(f, e) for n, e in f.tensors.items() if n.endswith("_proj.weight")}
        fixed = {n: np.asarray(f.tensor(n), dtype=np.float32) for n in ("model.embed_tokens.weight", "lm_head.weight")
                 if n in f.tensors}
    m = occrt.load(out)
    want = m.forward(np.asarray(IDS), m.new_cache(len(IDS)), all_logits=True)
    head = head_logits(teacher)
    with torch.no_grad(), Student(teacher, records, fixed) as student:
        student.set(True)
        got = head(student.hidden(torch.tensor([IDS]))).numpy()
        student.set(False)
        plain = head(student.hidden(torch.tensor([IDS]))).numpy()
    with torch.no_grad(), Student(teacher, records, fixed, torch.bfloat16) as student:  # the products' operands
        student.set(True)
        rounded = head(student.hidden(torch.tensor([IDS]))).numpy()
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    assert 1e-4 < np.abs(rounded - want).max() / np.abs(want).max() < 2e-2  # rounded to 8 significant bits
    assert np.abs(plain - hf_logits(tiny_llama_dir, IDS)).max() < 1e-4
    assert np.abs(plain - want).max() > 1e-2  # the coded model is not the source


def test_tuning_is_on_by_default_with_calibration_where_supported(tiny_llama_dir, tmp_path):
    """--tune-steps unset: 32 steps with --calib on a family whose torch model holds the linear layers as occrt
    stores them; 0 without --calib, and 0 for Phi-3 (fused q/k/v) and GPT-2 (Conv1D); a number given is kept."""
    from occrt.converters.finetune import DEFAULT_STEPS
    from tests.test_families import make_family_dir

    llama = open_source(tiny_llama_dir).config
    assert ConvertOptions(bpw=3.0, calib="c.txt").for_source(llama).tune_steps == DEFAULT_STEPS
    assert ConvertOptions(bpw=3.0).for_source(llama).tune_steps == 0
    assert ConvertOptions(bpw=3.0, calib="c.txt", tune_steps=5).for_source(llama).tune_steps == 5
    for name in ("phi3", "gpt2"):
        cfg = open_source(make_family_dir(tmp_path / name, name)).config
        assert ConvertOptions(bpw=3.0, calib="c.txt").for_source(cfg).tune_steps == 0


def test_the_head_backward_in_slices_equals_the_whole_backward():
    """backward_through_head: the slices' losses differentiated one at a time into the hidden states, then the layers
    below once, give the gradients (and the loss) of the whole computation."""
    import torch

    from occrt.converters.calibrate import backward_through_head

    torch.manual_seed(0)
    layer, head = torch.nn.Linear(8, 8), torch.randn(50, 8)
    x, targets = torch.randn(37, 8), torch.randint(0, 50, (37,))

    def loss(h, a, b):
        return torch.nn.functional.cross_entropy(h @ head.T, targets[a:b], reduction="sum")

    total = backward_through_head(layer(x), loss, chunk=10)  # slices of 10, 10, 10 and 7 positions
    sliced = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    whole = loss(layer(x), 0, 37)
    whole.backward()
    assert total == pytest.approx(float(whole.detach()), rel=1e-5)
    for got, p in zip(sliced, layer.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("softcap, bias", [(None, False), (3.0, True)])
def test_the_tuning_kl_and_its_gradient_in_closed_form_are_autograds(softcap, bias):
    """HeadKL: Σ KL(p_teacher ‖ p_student) over positions, and its gradient through the student's head into the layer
    below, computed in slices into reused buffers without a graph over the vocabulary, equal what autograd gets from
    the plain formula (with Gemma's final soft cap and a head bias too)."""
    import torch
    from types import SimpleNamespace

    from occrt.converters.finetune import HeadKL

    torch.manual_seed(0)
    layer, head, teacher_head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 50, bias=bias), torch.randn(50, 8)
    for p in head.parameters():
        p.requires_grad_(False)
    model = SimpleNamespace(get_output_embeddings=lambda: head, config=SimpleNamespace(final_logit_softcapping=softcap))
    x, hidden_teacher = torch.randn(37, 8), torch.randn(37, 8)

    def logits(h, weight):
        z = h @ weight.T + (head.bias if bias else 0.0)
        return torch.tanh(z / softcap) * softcap if softcap else z

    kl = HeadKL(model, teacher_head, chunk=10)  # slices of 10, 10, 10 and 7 positions
    values = [kl.backward(layer(x), hidden_teacher, 1.0 / 37) for _ in range(2)]
    closed = [p.grad.clone() / 2 for p in layer.parameters()]
    layer.zero_grad()
    target = torch.log_softmax(logits(hidden_teacher, teacher_head), dim=-1)
    plain = (target.exp() * (target - torch.log_softmax(logits(layer(x), head.weight), dim=-1))).sum() / 37
    plain.backward()
    assert values[0] == values[1] == pytest.approx(float(plain.detach()), rel=1e-5)
    for got, p in zip(closed, layer.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)


def test_the_tuning_products_are_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    """product_dtype: bfloat16 where torch reports AVX512-BF16 or AMX, float32 otherwise (emulated bfloat16 is
    slower than float32)."""
    import torch

    from occrt.converters.finetune import product_dtype

    for avx512_bf16, amx, want in ((False, False, torch.float32), (True, False, torch.bfloat16),
                                   (False, True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert product_dtype() == want


def test_the_tuning_teacher_leaves_the_linear_weights_unread(tmp_path):
    """calibration_model(linear_weights=False): the coded layers' weights stay on the meta device (no memory), every
    other tensor is the source's."""
    from occrt.converters.calibrate import calibration_model

    source = open_source(make_llama_dir(tmp_path / "m"))
    full, rules = calibration_model(source)
    lean, _ = calibration_model(source, linear_weights=False)
    linear = {r.source for r in rules}
    for name, p in lean.named_parameters():
        if name in linear:
            assert p.is_meta, name
        else:
            assert not p.is_meta and np.array_equal(p.detach().numpy(), full.get_parameter(name).detach().numpy()), name
    assert linear and all(n in dict(lean.named_parameters()) for n in linear)


def _family_source(family, tmp_path):
    if family == "llama":
        return open_source(make_llama_dir(tmp_path / family))
    if family == "gemma2":
        from tests.test_gemma import make_gemma_dir

        return open_source(make_gemma_dir(tmp_path / family, family))
    from tests.test_families import make_family_dir

    return open_source(make_family_dir(tmp_path / family, family, seed=3))


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_self_sampled_windows_are_the_models_own_draws(family, tmp_path, monkeypatch):
    """--calib self: windows of BOS + ctx tokens, drawn with a key/value cache and several windows at a time, are the
    draws a plain sampler makes (whole prefix recomputed each step, same generator): the cache and the batching
    change nothing; the same seed gives the same windows, another seed others."""
    import torch

    from occrt.converters import calibrate as cal
    from occrt.converters.calibrate import calibration_model, sample_start, sampled_windows, window_cache_bytes

    source = _family_source(family, tmp_path)
    model, _ = calibration_model(source)
    start, ctx = sample_start(source), 24
    monkeypatch.setattr(cal, "_SAMPLE_CACHE_BYTES", 2 * window_cache_bytes(source.config, ctx))  # batches 2, 2, 1
    windows = sampled_windows(model, source, n_tokens=100, ctx=ctx, seed=7)
    assert len(windows) == 5 and all(len(w) == ctx + 1 and w[0] == start for w in windows)

    gen = torch.Generator().manual_seed(7)
    plain = []
    with torch.no_grad():
        for size in (2, 2, 1):
            ids = torch.full((size, 1), start, dtype=torch.long)
            for _ in range(ctx):
                probs = torch.softmax(model(input_ids=ids, use_cache=False).logits[:, -1].double(), dim=-1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
            plain += ids.tolist()
    assert windows == plain
    assert sampled_windows(model, source, n_tokens=100, ctx=ctx, seed=7) == windows
    assert sampled_windows(model, source, n_tokens=100, ctx=ctx, seed=8) != windows


def test_calib_self_needs_no_text_and_helps(tiny_llama_dir, tmp_path):
    """`--calib self` converts from windows the source model samples (no file read) and, like a calibration text,
    brings the coded model closer to the source than the data-free conversion at the same rate."""
    ref = hf_logits(tiny_llama_dir, IDS)
    errs = {}
    for label, extra in (("plain", {}), ("self", {"calib": "self", "calib_tokens": 512, "tune_steps": 0})):
        out = str(tmp_path / f"{label}.occ")
        summary = convert(tiny_llama_dir, out, ConvertOptions(bpw=3.0, rotate="in", **extra), log=lambda m: None)
        assert abs(summary["linear_bpw"] / 3.0 - 1) < 0.02
        m = occrt.load(out)
        errs[label] = float(np.linalg.norm(m.forward(np.asarray(IDS), m.new_cache(16), all_logits=True) - ref))
    assert errs["self"] < errs["plain"], errs


def test_the_tuning_rate_decays_from_its_peak_to_near_zero():
    """finetune.learning_rate: the first step at the peak, every later step smaller, the last a few thousandths of
    the peak (never 0: the last window still counts)."""
    from occrt.converters.finetune import learning_rate

    rates = [learning_rate(step, 32, 3e-3) for step in range(32)]
    assert rates[0] == pytest.approx(3e-3)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:]))
    assert 0 < rates[-1] < 0.01 * 3e-3
    assert learning_rate(16, 32, 3e-3) == pytest.approx(1.5e-3)  # halfway: half the peak
    assert {learning_rate(step, 32, 3e-3, decay=False) for step in range(32)} == {3e-3}  # below 2.5 bits


def test_the_tuning_rate_halves_per_bit_above_three(tiny_llama_dir, calib_file, tmp_path, monkeypatch):
    """occrt convert tunes with finetune.peak_rate(--bpw): the default peak at 3 bits, half of it at 4, the default
    below 3."""
    from occrt.converters import finetune

    peaks = []
    real = finetune.tune_scales

    def spy(*args, lr, **kw):
        peaks.append(lr)
        return real(*args, lr=lr, **kw)

    monkeypatch.setattr(finetune, "tune_scales", spy)
    for bpw in (3.0, 4.0):  # (2 bits do not hold the tiny model's multipliers)
        convert(tiny_llama_dir, str(tmp_path / f"{bpw}.occ"),
                ConvertOptions(bpw=bpw, calib=calib_file, calib_tokens=256, tune_steps=1), log=lambda m: None)
    assert peaks == pytest.approx([finetune.DEFAULT_LR, finetune.DEFAULT_LR / 2])
    assert finetune.peak_rate(2.0) == finetune.DEFAULT_LR
    assert finetune.decays(2.5) and not finetune.decays(2.0)
    assert finetune.decays(2.0, finetune.DEFAULT_STEPS + 1) and not finetune.decays(2.0, finetune.DEFAULT_STEPS)


def test_the_tuning_shrinks_the_sensitivity_weighting():
    """Each tensor's squared error is weighted by (F_t / geometric mean F) ** power in the allocation; the power is
    smaller when the end-to-end tuning follows the coding (its multipliers absorb much of the attention layers'
    error, whose Fisher is the largest), and an unsettled tune_steps (None) counts as untuned."""
    from occrt.converters.calibrate import Calibration
    from occrt.converters.policy import SENSITIVITY_POWER, TUNED_SENSITIVITY_POWER, CodingOptions, Policy

    v, up = "model.layers.0.self_attn.v_proj.weight", "model.layers.0.mlp.up_proj.weight"
    cal = Calibration(tokens=64, hessians={}, fisher={v: 16.0, up: 1.0})
    assert 0 < TUNED_SENSITIVITY_POWER < SENSITIVITY_POWER
    for steps, power in ((0, SENSITIVITY_POWER), (None, SENSITIVITY_POWER), (32, TUNED_SENSITIVITY_POWER)):
        policy = Policy(CodingOptions(bpw=3.0, calib="calib.txt", tune_steps=steps))
        policy.use_calibration(cal)
        assert policy.importance(v) == pytest.approx(4.0 ** power)  # the geometric mean of 16 and 1 is 4
        assert policy.importance(up) == pytest.approx(0.25 ** power)
        assert policy.importance("model.layers.1.mlp.up_proj.weight") == 1.0  # no Fisher: unweighted
