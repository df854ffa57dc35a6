"""Circulant-family references (C3A, FourierFT): parity with PEFT 0.21 and the structure of
their weight changes.

PEFT runs both methods' FFTs in float32 whatever the model dtype (C3A casts the kernel and x
to float32; FourierFT builds its dense spectrum in float32 and calls ``spectrum.float()``), so
a float64 PEFT layer carries float32 rounding: the layer-level comparisons use the float32
tolerance.  The exact (1e-10) comparisons run PEFT's own FFT formulas in float64.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import peft
from peft.tuners.c3a.utils import BlockCircularConvolution, get_circulant_fast

from fastadapt.numerics import assert_rel_close
from fastadapt.reference.circulant import C3A, REFERENCES, FourierFT, circulant_block, spectrum_indices
from fastadapt.testing import linear_model, noncontig, randn, randomize_

F64, F32 = torch.float64, torch.float32


def peft_layer(model, config):
    peft_model = peft.get_peft_model(model, config)
    return peft_model, peft_model.base_model.model[0]


def peft_merged_weight(peft_model):
    return copy.deepcopy(peft_model).merge_and_unload()[0].weight.detach()


# ---------------------------------------------------------------------------------------- C3A

@pytest.mark.parametrize("d_in,d_out,block_size,bias", [(15, 10, 5, True), (12, 18, 3, False)])
def test_c3a_matches_peft(d_in, d_out, block_size, bias):
    model = linear_model(d_in, d_out, bias=bias)
    peft_model, layer = peft_layer(model, peft.C3AConfig(target_modules=["0"], block_size=block_size))
    randomize_(layer, names=["c3a_kernel"], scale=1.0)
    ref = C3A.from_peft(layer)
    x = randn(3, 4, d_in)
    kernel = layer.c3a_kernel["default"].detach()
    assert kernel.dtype == F64
    # PEFT's FFT formulas, run in float64: exact.
    assert_rel_close(ref.delta_weight(), get_circulant_fast(kernel) / d_in, name="C3A dW vs get_circulant_fast")
    assert_rel_close(ref(x) - ref.base(x), BlockCircularConvolution.apply(x, kernel) / d_in,
                     name="C3A forward vs BlockCircularConvolution")
    # PEFT's layer (float32 FFTs by design): float32 tolerance.
    with torch.no_grad():
        assert_rel_close(ref(x), peft_model(x), F32, name="C3A forward vs PEFT layer")
        assert_rel_close(ref.merged_weight(), peft_merged_weight(peft_model), F32, name="C3A merged vs PEFT")
        assert_rel_close(ref.delta_weight(), layer.get_delta_weight("default"), F32, name="C3A dW vs PEFT")


def test_c3a_blocks_are_circulant():
    ref = C3A(randn(6, 9), block_size=3, c3a_kernel=randn(2, 3, 3))
    blocks = (ref.delta_weight() * 9).reshape(2, 3, 3, 3).permute(0, 2, 1, 3)   # (m, n, k, j)
    for k in range(3):   # row k is row 0 rotated right by k
        assert torch.equal(blocks[:, :, k], torch.roll(blocks[:, :, 0], shifts=k, dims=-1))
    assert_rel_close(blocks[:, :, 0], ref.c3a_kernel.detach(), name="row 0 is the kernel")
    assert torch.equal(circulant_block(torch.tensor([1.0, 2.0, 3.0])),
                       torch.tensor([[1.0, 2.0, 3.0], [3.0, 1.0, 2.0], [2.0, 3.0, 1.0]]))


def test_c3a_zero_kernel_is_identity():
    w = randn(4, 8)
    assert torch.equal(C3A(w, block_size=4).merged_weight(), w)


# ---------------------------------------------------------------------------------------- FourierFT

@pytest.mark.parametrize("d_in,d_out,n_frequency,seed,bias", [(13, 9, 40, 777, True), (16, 7, 111, 3, False)])
def test_fourierft_matches_peft(d_in, d_out, n_frequency, seed, bias):
    model = linear_model(d_in, d_out, bias=bias)
    config = peft.FourierFTConfig(target_modules=["0"], n_frequency=n_frequency, scaling=17.0, random_loc_seed=seed)
    peft_model, layer = peft_layer(model, config)
    randomize_(layer, names=["fourierft_spectrum"], scale=1.0)
    ref = FourierFT.from_peft(layer)
    # Locations regenerated from the seed equal PEFT's.
    assert torch.equal(ref.indices, layer.indices["default"])
    # PEFT's formula, real(ifft2(S)) * scaling, run in float64: exact.
    dense = torch.zeros(d_out, d_in, dtype=F64)
    dense[layer.indices["default"][0], layer.indices["default"][1]] = layer.fourierft_spectrum["default"].detach()
    assert_rel_close(ref.dense_spectrum(), dense, name="dense spectrum")
    assert_rel_close(ref.delta_weight(), torch.fft.ifft2(dense).real * 17.0, name="FourierFT dW vs float64 ifft2")
    # PEFT's layer (float32 ifft2 by design): float32 tolerance.
    x = randn(2, 5, d_in)
    with torch.no_grad():
        assert_rel_close(ref.delta_weight(), layer.get_delta_weight("default"), F32, name="FourierFT dW vs PEFT")
        assert_rel_close(ref(x), peft_model(x), F32, name="FourierFT forward vs PEFT layer")
        assert_rel_close(ref.merged_weight(), peft_merged_weight(peft_model), F32, name="FourierFT merged vs PEFT")


def test_fourierft_single_frequency_is_a_plane_wave():
    """One coefficient c at (p, q): dW[j, k] = scaling c cos(2 pi (p j / out + q k / in)) / (out in)."""
    d_out, d_in, scaling = 9, 14, 3.0
    ref = FourierFT(randn(d_out, d_in), n_frequency=1, scaling=scaling, random_loc_seed=5,
                    fourierft_spectrum=torch.tensor([0.7], dtype=F64))
    p, q = ref.indices[:, 0].tolist()
    j, k = torch.arange(d_out, dtype=F64)[:, None], torch.arange(d_in, dtype=F64)[None, :]
    wave = scaling * 0.7 * torch.cos(2 * torch.pi * (p * j / d_out + q * k / d_in)) / (d_out * d_in)
    assert_rel_close(ref.delta_weight(), wave, name="plane wave")


def test_fourierft_indices_depend_on_seed_only():
    a, b = spectrum_indices(10, 12, 30, 1), spectrum_indices(10, 12, 30, 1)
    assert torch.equal(a, b) and not torch.equal(a, spectrum_indices(10, 12, 30, 2))
    assert len(set(zip(*a.tolist()))) == 30   # distinct locations
    w = randn(10, 12)
    assert torch.equal(FourierFT(w, n_frequency=30).merged_weight(), w)   # zero spectrum: identity


# ---------------------------------------------------------------------- merged == forward, errors

@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_forward_equals_merged_weight(name):
    ref = REFERENCES[name].demo()
    assert ref.weight.dtype == F64
    x = noncontig(randn(3, 5, ref.in_features))
    assert_rel_close(ref(x), F.linear(x, ref.weight + ref.delta_weight(), ref.bias), name=name)
    assert ref.delta_weight().abs().max() > 1e-3


@pytest.mark.parametrize("make,parameter", [
    (lambda w: C3A(w, block_size=5), "block_size"),
    (lambda w: C3A(w, block_size=4), "block_size"),            # divides in (12), not out (6)
    (lambda w: C3A(w, block_size=3, c3a_kernel=randn(2, 4, 2)), "c3a_kernel"),
    (lambda w: FourierFT(w, n_frequency=0), "n_frequency"),
    (lambda w: FourierFT(w, n_frequency=73), "n_frequency"),
    (lambda w: FourierFT(w, n_frequency=3, fourierft_spectrum=randn(4)), "fourierft_spectrum"),
])
def test_bad_configuration_names_parameter(make, parameter):
    w = randn(6, 12)
    with pytest.raises(ValueError, match=parameter):
        make(w)
